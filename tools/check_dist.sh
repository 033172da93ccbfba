#!/usr/bin/env bash
# What a user gets from `pip install`: build the wheel and sdist of cai-engine and of each domain plugin, install
# them into fresh virtual environments (one from the wheels, one from the sdists), run `pip check`, run the plugins'
# own tests against the installed packages (from a temporary folder, never the source tree), score a check with
# `cai checks eval` on the case files the installed plugin carries, and run the core tests that read examples/,
# bench/ and plugins/ from the unpacked sdist.
#
#   tools/check_dist.sh                         Python 3.11, extras train,eval,serve (torch==2.13.0 first)
#   tools/check_dist.sh --python python3.10 --extras serve --no-torch
#   tools/check_dist.sh --only wheel --keep     one kind of install; keep the temporary folder to look at
#
# Packages come from the configured index (PyPI); torch is always pinned to 2.13.0 and installed first (the CPU
# wheel; anything else pulls CUDA). --no-torch is for extras that do not need it (serve, eval, docs), e.g. on a
# Python the CPU wheel is not at hand for. Exits non-zero at the first failure; the last lines say what passed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=python3
EXTRAS=train,eval,serve
TORCH=1
ONLY="wheel sdist"
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON=$2; shift 2 ;;
    --extras) EXTRAS=$2; shift 2 ;;
    --no-torch) TORCH=0; shift ;;
    --only) ONLY=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check_dist: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

WORK=$(mktemp -d -t cai-dist-XXXXXX)
if [ "$KEEP" = 1 ]; then echo "check_dist: working in $WORK (kept)"; else trap 'rm -rf "$WORK"' EXIT; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
say() { printf '\n== %s\n' "$*"; }
PASSED=()

# -- build ------------------------------------------------------------------------------------------------------------
say "building with $($PYTHON --version) into $WORK/dist"
$PYTHON -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install --quiet build
PROJECTS=("$ROOT" "$ROOT"/plugins/cai-*)
for project in "${PROJECTS[@]}"; do
  # sdist first, then the wheel built from the unpacked sdist: a file the sdist lacks is missing from the wheel too
  "$WORK/build-env/bin/python" -m build --outdir "$WORK/dist" "$project" >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; echo "check_dist: building $project failed" >&2; exit 1; }
done
ls -1 "$WORK/dist"

# -- what the archives hold -------------------------------------------------------------------------------------------
say "archive contents"
"$WORK/build-env/bin/python" - "$WORK/dist" "$ROOT" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path

dist, root = Path(sys.argv[1]), Path(sys.argv[2])
problems = []
for wheel in sorted(dist.glob("cai_*-py3-none-any.whl")):
    names = zipfile.ZipFile(wheel).namelist()
    package = wheel.name.split("-")[0]
    if package == "cai_engine":
        need = ["cai_engine/_data/constitutions/harmless.yaml", "cai_engine/_data/schemas/constitution.schema.json",
                "cai_engine/data/exchanges/harmless.jsonl", "cai_engine/data/prompts/principle-requests.jsonl"]
    else:
        source = root / "plugins" / package.replace("_", "-") / package / "cases"
        need = [f"{package}/cases/{p.name}" for p in sorted(source.glob("*.jsonl"))] or [f"{package}/cases/"]
        need += [f"{package}/constitutions/{package.split('_')[1]}.yaml"]
        shipped = root / "plugins" / package.replace("_", "-") / package / "classifiers"
        need += [
            f"{package}/classifiers/{d.name}/{f}"
            for d in sorted(shipped.iterdir() if shipped.is_dir() else [])
            for f in ("classifier.json", "head.safetensors")
        ]
    missing = [n for n in need if n not in names]
    problems += [f"{wheel.name} lacks {n}" for n in missing]
    print(f"{wheel.name}: {len(names)} files, {len(need) - len(missing)}/{len(need)} data files checked")
core = next(dist.glob("cai_engine-*.tar.gz"))
top = core.name.removesuffix(".tar.gz")
names = set(tarfile.open(core).getnames())
# every folder the test suite reads through ROOT, and a file of each
for path in ["examples/clinic-policy.yaml", "bench/data/guard-cases.jsonl", "plugins/cai-medical/pyproject.toml",
             "plugins/cai-medical/cai_medical/cases/medical.phi.jsonl", "plugins/cai-legal/tests/test_cai_legal.py",
             "conftest.py", "schemas/policy.schema.json",
             "tools/architecture.py", "docs/architecture.md"]:
    if f"{top}/{path}" not in names:
        problems.append(f"{core.name} lacks {path}")
print(f"{core.name}: {len(names)} files")
if problems:
    sys.exit("check_dist: " + "; ".join(problems))
EOF
PASSED+=("archives hold the data files and the folders the tests read")

# -- install and test -------------------------------------------------------------------------------------------------
run_plugin_tests() {  # $1: the venv; the plugins' tests, copied away from the source tree
  local venv=$1 tests="$WORK/plugin-tests-$2"
  mkdir -p "$tests"
  for plugin in "$ROOT"/plugins/cai-*; do cp -r "$plugin/tests" "$tests/$(basename "$plugin")"; done
  (
    cd "$tests"
    # the installed packages, not a checkout: fail if either resolves to the source tree
    "$venv/bin/python" -c "
import sys, cai_engine, cai_medical, cai_financial, cai_legal
for m in (cai_engine, cai_medical, cai_financial, cai_legal):
    assert m.__file__.startswith(sys.prefix), f'{m.__name__} comes from {m.__file__}, not the venv'
print('imports from', sys.prefix)"
    CAI_DISABLE_PLUGIN_AUTOLOAD=1 HF_HUB_OFFLINE=1 XDG_CACHE_HOME="$WORK/cache" CAI_CACHE_DIR="$WORK/cache/cai" \
      "$venv/bin/python" -m pytest -q -p no:cacheprovider -p no:randomly -m "not model and not server" .
  )
}

for kind in $ONLY; do
  venv="$WORK/venv-$kind"
  say "installing from the ${kind}s into a fresh venv ($venv)"
  $PYTHON -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  if [ "$TORCH" = 1 ]; then "$venv/bin/pip" install --quiet torch==2.13.0; fi
  if [ "$kind" = wheel ]; then
    core=$(ls "$WORK"/dist/cai_engine-*.whl); plugins=$(ls "$WORK"/dist/cai_{medical,financial,legal}-*.whl)
  else
    core=$(ls "$WORK"/dist/cai_engine-*.tar.gz); plugins=$(ls "$WORK"/dist/cai_{medical,financial,legal}-*.tar.gz)
  fi
  # the plugins' tests also need pytest and jsonschema (from the dev extra, not installed whole: it brings linters)
  constraint=()
  if [ "$TORCH" = 1 ]; then constraint=(torch==2.13.0); fi
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet "${core}[${EXTRAS}]" $plugins pytest jsonschema "${constraint[@]}"
  say "pip check ($kind)"
  "$venv/bin/pip" check
  PASSED+=("$kind install: pip check")
  say "the plugins' own tests against the installed $kind packages"
  run_plugin_tests "$venv" "$kind"
  PASSED+=("$kind install: plugins' tests")
  say "cai checks eval on the case files an installed plugin carries ($kind)"
  (
    cd "$WORK"
    cases=$("$venv/bin/python" -c \
      'from importlib.resources import files; print(files("cai_medical") / "cases" / "medical.phi.jsonl")')
    XDG_CACHE_HOME="$WORK/cache" "$venv/bin/cai" plugins | grep -q '"medical"'
    XDG_CACHE_HOME="$WORK/cache" "$venv/bin/cai" checks eval --check medical.phi --cases "$cases" | tail -1
  )
  PASSED+=("$kind install: cai checks eval on the shipped cases")
done

if [[ " $ONLY " == *" sdist "* ]]; then
  say "core tests that read examples/, bench/ and plugins/, from the unpacked sdist"
  mkdir -p "$WORK/unpacked"
  tar -xzf "$WORK"/dist/cai_engine-*.tar.gz -C "$WORK/unpacked"
  tree=$(ls -d "$WORK"/unpacked/cai_engine-*)
  (
    cd "$tree"
    "$WORK/venv-sdist/bin/python" -m pytest -q -p no:cacheprovider -p no:randomly \
      -m "not model and not server and not slow" \
      tests/test_examples.py tests/test_schema.py tests/test_domain_plugins.py tests/test_packaging.py \
      "tests/test_guard.py::test_the_shipped_rules_only_examples_never_need_a_model"
  )
  PASSED+=("sdist: core tests from the unpacked tree")
fi

say "check_dist passed in ${SECONDS} s ($($PYTHON --version), extras [$EXTRAS]):"
printf '  - %s\n' "${PASSED[@]}"
