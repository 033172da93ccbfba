"""The runtime guard: the policy, the embedding ``Engine``, the components it guards with, the check-revise loop,
files, ``cai serve`` and the audit."""
