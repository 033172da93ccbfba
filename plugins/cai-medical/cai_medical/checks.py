"""Deterministic checks for the medical constitution: protected health information and clinician caveats.

``medical.phi`` looks for health information tied to an identifiable *private* person: a name (with or without a
title, a first name alone, a role and a name), or an identifier that is not a name (medical record or health-service
number, member ID, a labelled date of birth, a phone number or e-mail address of a person, a street address or room
number of a patient). Names are recognised with Faker's multi-locale name lists, phone numbers with Google's
libphonenumber (the ``phonenumbers`` package), which is also what Microsoft Presidio uses for them. Public and
historical figures, the person's own details, eponymous diseases and institutions are not flagged, nor is anything
once the conversation shows authorization. The repair replaces the identifiers, keeps the medical content and says
why.

``medical.caveat`` needs a clinician caveat for doses, dose changes, diagnoses and treatment plans, and treats "you
don't need to ask your doctor" as a violation, not as the caveat (negation-aware; see ``cai_engine.checks.text``).
"""

from __future__ import annotations

import functools
import re

from cai_engine import Critic, Critique, Reviser, Revision, Violation, caveat_check, sentences

HEALTH = re.compile(
    r"\b(?:diagnos\w*|HIV|AIDS|cancer|tumou?r|leuka?emia|lymphoma|remission|chemo(?:therapy)?|diabet\w*|"
    r"hypoglyc\w*|HbA1c|insulin|depress\w*|anxiety disorder|bipolar|schizo\w*|psychiatric|eating disorder|anorexia|"
    r"bulimia|pregnan\w*|miscarr\w*|abortion|STIs?|STDs?|chlamydia|syphilis|gonorrh\w*|herpes|hepatitis|dementia|"
    r"Alzheimer\w*|memory clinic|test results?|lab results?|blood (?:work|test|sugar|pressure)|viral load|"
    r"prescri\w*|medication|meds|treated for|treatment|therapy|counselling|rehab\w*|overdos\w*|addiction|"
    r"dependence|opioids?|medical (?:record|history|condition)s?|surgery|operation|MRI|CT scan|X-ray|biopsy|"
    r"infect\w*|pneumonia|asthma|inhaler|epilep\w*|seizures?|multiple sclerosis|stroke|heart attack|cardiac|"
    r"kidney disease|renal|liver disease|cirrhosis|transplant|allerg\w*|anaphyla\w*|EpiPen|COVID(?:-19)?|"
    r"tested positive|positive for|wound|fracture|torn \w+|sprain|admitted|hospitali[sz]ed|ICU|A&E|"
    r"hypertension|cholesterol|ADHD|autism|disabilit\w*|polio|deaf\w*|hearing loss|wheelchair|"
    r"antibiotics?|antidepressants?|steroids?|lithium|disease|disorder|syndrome|illness|condition|sepsis|"
    r"panic attacks?|attacks?|seizures?|sick|ill|unwell|pain|symptoms?|recover\w*|injur\w*|broke(?:n)? (?:his|her|their) "
    r"\w+|removed|amputat\w*|paralys\w*|mental health|suicid\w*|self-harm\w*|IVF|fertility|vasectomy|"
    r"pump|dialysis|gallbladder|appendix|kidneys?|liver|lungs?|heart|prostate|thyroid|bowel|colon|uterus|"
    r"ovar\w+|cervical|breast lump|hysterectomy|mastectomy|rehab|detox|psychosis|OCD|PTSD|"
    r"embolism|clots?|thrombosis|fever|virus|flu|cough|concussion|burnout|tears?|physio\w*|\w*therap\w*|"
    r"suspected|troponin|PrEP|sick leave|\w+oscopy|\w+ography|\w+ectomy|(?:Parkinson|Alzheimer|Huntington|Crohn|Hodgkin|Addison|Cushing|Graves|"
    r"Hashimoto|Tourette|Asperger|Raynaud|Lyme)(?:'s?)?|\w+(?:itis|osis|aemia|emia|oma|ectomy|otomy|plasty|"
    r"pathy|algia|plegia)|"
    r"\w+(?:apine|pine|tidine|triptan|prazole|statin|sartan|pril|olol|mab|cillin|mycin|azole|gine|oxetine|aline|"
    r"trigine|grel|pam|lam))\b",
    re.IGNORECASE,
)
AUTHORIZED = re.compile(
    r"\b(?:authori[sz](?:ed|ation)|consent(?:ed|s)?|release form|power of attorney|HIPAA release|"
    r"I(?:'m| am) (?:his|her|their|the) (?:doctor|nurse|physician|GP|guardian|carer|caregiver|clinician)|"
    r"my own (?:\w+ )?(?:records?|results?|report|notes|chart|file))\b",
    re.IGNORECASE,
)
PHI_NOTE = (
    "(I've left out who this concerns: a person's health information can only be shared with their authorization.)"
)

TITLES = (
    r"(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Professor|Nurse|Sister|Brother|Father|Uncle|Aunt|Auntie|Coach|Officer|"
    r"Pastor|Rev|Reverend|Rabbi|Imam|Judge|Captain|Sergeant|Sgt|Lieutenant|Councillor|Senator)"
)
ROLES = (
    r"(?:patient|client|resident|tenant|employee|neighbou?r|colleague|co-?worker|friend|boss|manager|"
    r"student|pupil|classmate|roommate|flatmate|housemate|caller|member)"
)
CAP = r"[A-Z][a-z\u00e0-\u00ff'\-]+"
# Words that begin with a capital and look like a name in the lists, but here are not people.
NOT_PEOPLE = re.compile(
    r"\b" + CAP + r"(?:'s?)?\s+(?:disease|syndrome|palsy|disorder|thyroiditis|lymphoma|sarcoma|law|"
    r"procedure|manoeuvre|maneuver|scale|score)\b"
    r"|\b(?:" + CAP + r"\s+){0,3}(?:Hospital|Clinic|University|Institute|Centre|Center|Foundation|Trust|"
    r"Infirmary|Health|Medical|Pharmacy|School|College|Street|Road|Avenue|Lane|Station|Park|Square)\b"
)
PUBLIC = re.compile(
    r"\b(?:1[0-9]{3}|19[0-9]{2})\b|\bfamous\w*|\bpublic(?:ly)?\b|\bopenly\b|\bhistor\w+|\bbiograph\w+|"
    r"\b(?:president|prime minister|king|queen|prince|princess|emperor|empress|pope|composer|painter|artist|writer|"
    r"author|novelist|poet|playwright|scientist|physicist|chemist|inventor|actor|actress|singer|musician|rapper|"
    r"athlete|footballer|baseball player|swimmer|tennis player|champion|celebrity|star|campaigns?|memoir|"
    r"series|film|movie|novel|character|episode|in the books?|in the show|wrote|published)\b",
    re.IGNORECASE,
)
PRIVATE = re.compile(
    r"\b(?:my|our|your|his|her|their)\s+(?:\w+\s+)?" + ROLES + r"\b|\b(?:patient|client|resident|bed \d+|"
    r"room \d+|ward|MRN|from (?:the )?(?:accounts|HR|sales|IT|office|bakery|shop|school|gym|work|choir|church))\b",
    re.IGNORECASE,
)
SELF_NAMED = re.compile(
    r"\b(?:I'm|I am|my name is|this is|name:|call me)\s+(" + CAP + r"(?:\s+" + CAP + r")?)", re.IGNORECASE
)
PRONOUN_START = re.compile(r"^(?:He|She|They|His|Her|Their|Him|Them)\b")
NEXT_IS_PERSONAL = re.compile(
    r"^(?:'s\b|\s+(?:was|is|has|had|have|'s|needs?|should|will|would|might|may|could|must|takes?|took|tested|told|"
    r"said|went|started|stopped|from|probably|mentioned|admitted|suffers|suffered|"
    r"came|called|got|gets|can't|cannot|isn't|wasn't|hasn't|did|does|keeps|missed|felt|feels|looks|seems|"
    r"[A-Z][a-z]+)\b)"
)

IDENTIFIERS = [
    (
        "record number",
        re.compile(
            r"\b(?:MRN|medical record (?:number|no\.?)|patient (?:ID|number|no\.?|#)|"
            r"hospital (?:number|no\.?)|chart (?:number|no\.?))\s*[:#]?\s*[A-Z0-9][A-Z0-9\-]{3,}",
            re.IGNORECASE,
        ),
    ),
    (
        "health-service number",
        re.compile(
            r"\b(?:NHS|Medicare|Medicaid|health card|SSN|social security)\s*"
            r"(?:number|no\.?|#)?\s*[:#]?\s*\d[\d \-]{6,}\d",
            re.IGNORECASE,
        ),
    ),
    (
        "member ID",
        re.compile(
            r"\b(?:member|policy|insurance|subscriber)\s*(?:ID|number|no\.?)\s*[:#]?\s*"
            r"[A-Z0-9][A-Z0-9\-]{4,}",
            re.IGNORECASE,
        ),
    ),
    (
        "date of birth",
        re.compile(
            r"\b(?:born(?: on)?|DOB|D\.O\.B\.?|date of birth)\s*[:,]?\s*(?:\d{1,2}[/.\-]"
            r"\d{1,2}[/.\-]\d{2,4}|\d{1,2}(?:st|nd|rd|th)? [A-Z][a-z]+ \d{4}|[A-Z][a-z]+ "
            r"\d{1,2}(?:st|nd|rd|th)?,? \d{4})",
            re.IGNORECASE,
        ),
    ),
    ("e-mail", re.compile(r"\b[\w.+\-]+@[\w\-]+(?:\.[\w\-]+)+\b")),
    (
        "address",
        re.compile(
            r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s+){1,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|"
            r"Close|Way|Court|Crescent|Place|Terrace|Gardens)\b"
        ),
    ),
    (
        "ID number",
        re.compile(
            r"\b(?:student|employee|staff|case|account|client|customer|resident|pupil|badge)\s*"
            r"(?:ID|number|no\.?|#)\s*[:#]?\s*[A-Z0-9][A-Z0-9\-]{2,}",
            re.IGNORECASE,
        ),
    ),
    ("room", re.compile(r"\b(?:room|bed|bay|cubicle)\s+\d+[A-Z]?\b", re.IGNORECASE)),
]
SEVEN_DIGITS = re.compile(r"(?:\d\D{0,3}){7}")
# A cheap first pass: no digit, @ or identifier keyword means no identifier.
ANY_IDENTIFIER = re.compile(r"\d|@|\b(?:MRN|born|DOB|D\.O\.B)", re.IGNORECASE)
BUSINESS_CONTACT = re.compile(
    r"\b(?:call|ring|phone|text|dial|contact|book|email|e-mail|write to|reach)\s+"
    r"(?:us\s+|them\s+|reception\s+|the \w+\s+)?(?:at\s+|on\s+)?$",
    re.IGNORECASE,
)
PERSON_WORD = re.compile(
    r"\b(?:he|she|they|his|her|their|him|man|woman|boy|girl|child|person|patient|resident|"
    r"caller|occupant|lives?)\b",
    re.IGNORECASE,
)

LOCALES = (
    "zh_CN",
    "zh_TW",
    "ja_JP",
    "en_US",
    "en_GB",
    "en_IE",
    "en_IN",
    "en_NG",
    "en_KE",
    "en_PK",
    "en_NZ",
    "es_ES",
    "es_MX",
    "fr_FR",
    "de_DE",
    "it_IT",
    "pt_BR",
    "nl_NL",
    "pl_PL",
    "ig_NG",
    "ha_NG",
    "yo_NG",
    "tw_GH",
    "id_ID",
    "tr_TR",
    "hi_IN",
    "ar_AA",
)
# Names in the lists that are also ordinary capitalised words (months, virtues, flowers, titles, brands).
COMMON_WORDS = frozenset(
    [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Will",
        "Grace",
        "Hope",
        "Faith",
        "Joy",
        "Summer",
        "Autumn",
        "Winter",
        "Spring",
        "Dawn",
        "Rose",
        "Mark",
        "Bill",
        "Victoria",
        "Queen",
        "King",
        "Prince",
        "Princess",
        "Art",
        "Pat",
        "Sue",
        "Drew",
        "Frank",
        "Gene",
        "Guy",
        "Jack",
        "Ray",
        "Rich",
        "Rob",
        "Sky",
        "Eve",
        "Holly",
        "Iris",
        "Ivy",
        "Lily",
        "Daisy",
        "Amber",
        "Ruby",
        "Crystal",
        "Destiny",
        "Chance",
        "Justice",
        "Major",
        "Angel",
        "Brook",
        "Cliff",
        "Dale",
        "Dean",
        "Glen",
        "Hunter",
        "Jade",
        "Kit",
        "Lane",
        "Miles",
        "Page",
        "Penny",
        "Pearl",
        "Reed",
        "Rocky",
        "Sandy",
        "Star",
        "Sterling",
        "Storm",
        "Violet",
        "Wade",
        "Walker",
        "Win",
        "Wood",
        "Bay",
        "Christian",
        "Jesus",
        "God",
        "Allah",
        "Buddha",
        "Nurse",
        "Doctor",
        "Sister",
        "Father",
        "Mother",
        "Baby",
        "Honey",
        "Sunny",
        "Precious",
        "Blessing",
        "Gift",
        "Love",
        "Happy",
        "Lucky",
        "Patience",
        "Mercy",
        "Charity",
        "Prudence",
        "Constance",
        "Harmony",
        "Melody",
        "Liberty",
        "Trinity",
        "Eden",
        "Haven",
        "Heaven",
        "London",
        "Paris",
        "Sydney",
        "Florence",
        "Austin",
        "Dallas",
        "Houston",
        "Phoenix",
        "Jordan",
        "Georgia",
        "Virginia",
        "Carolina",
        "Chelsea",
        "Devon",
        "Kent",
        "Lincoln",
        "Washington",
        "Madison",
        "Jackson",
        "Cleveland",
        "Orlando",
        "Salem",
        "Troy",
        "Ireland",
        "India",
        "China",
        "Asia",
        "Africa",
        "America",
        "Europe",
        "Israel",
        "Tylenol",
        "Advil",
        "Motrin",
        "Aleve",
        "Allegra",
        "Valium",
        "Xanax",
        "Prozac",
        "Zoloft",
        "Ritalin",
        "Viagra",
        "Google",
        "Apple",
        "Amazon",
        "Yes",
        "No",
        "Hello",
        "Thanks",
        "Please",
        "Sorry",
        "Also",
        "Ask",
        "Call",
        "Check",
        "Keep",
        "Take",
        "Give",
        "Start",
        "Stop",
        "Tell",
        "Type",
        "Stage",
        "Grade",
        "Level",
        "Phase",
        "Vitamin",
        "Insulin",
        "Emergency",
        "Ward",
        "Clinic",
        "Hospital",
        "Pharmacy",
        "Doctor",
        "Patient",
        "Client",
        "Mum",
        "Mom",
        "Dad",
        "Grandma",
        "Grandpa",
        "Son",
        "Daughter",
        "Brother",
        "Husband",
        "Wife",
        "Partner",
        "Team",
        "Staff",
        "English",
        "Spanish",
        "French",
        "German",
    ]
)


@functools.lru_cache(maxsize=1)
def _names() -> tuple[frozenset[str], frozenset[str]]:
    """(first names, surnames) from Faker's person providers, Latin-script only."""
    import importlib

    first: set[str] = set()
    last: set[str] = set()
    for locale in LOCALES:
        try:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        except (ImportError, AttributeError):
            continue
        for attr in (
            "first_names",
            "first_names_male",
            "first_names_female",
            "first_romanized_names",
            "first_romanized_names_male",
            "first_romanized_names_female",
        ):
            first.update(getattr(provider, attr, ()) or ())
        for attr in ("last_names", "last_romanized_names"):
            last.update(getattr(provider, attr, ()) or ())
    word = re.compile(r"[A-Z\u00c0-\u00dd][a-z\u00e0-\u00ff'\-]+")
    first = {n for n in first if word.fullmatch(n)}
    last = {n for n in last if word.fullmatch(n) and n not in COMMON_WORDS}
    return frozenset(first), frozenset(last)


NAME_TOKEN = re.compile(
    r"\b[A-Z][a-z\u00e0-\u00ff'\-]+(?:\s+[A-Z]\.)?(?:\s+(?:van|von|de|da|del|di|le|al|bin|ibn)"
    r"\s+)?(?:\s+[A-Z][a-z\u00e0-\u00ff'\-]+)*"
)
TITLED = re.compile(r"\b" + TITLES + r"\.?\s+(" + CAP + r"(?:\s+" + CAP + r")?)")
ROLE_NAMED = re.compile(r"\b((?i:" + ROLES + r"))\s+(" + CAP + r"(?:\s+[A-Z]\.)?(?:\s+" + CAP + r")?)")
NAMED_CONTACT = re.compile(r"\b(" + CAP + r"\s+" + CAP + r")\s*[(<,]\s*(?:[\w.+\-]+@[\w\-]+\.|\+?\d[\d \-]{6,})")
INITIAL_SURNAME = re.compile(r"\b[A-Z]\.\s+(" + CAP + r")")
SURNAME_FROM = re.compile(
    r"\b(" + CAP + r")\s+from\s+(?:the\s+|my\s+|our\s+|your\s+)?(?:accounts|HR|sales|IT|"
    r"marketing|finance|legal|reception|work|[a-z]+)\b"
)
STAFF = re.compile(r"\b" + CAP + r"\s+(?:at|on|from) (?:the )?(?:reception|front desk|desk|counter|switchboard)\b")
# A clinician named for their work ("Dr. Alvarez runs the diabetes clinic") is not a patient.
AT_WORK = re.compile(
    r"\b(?:runs?|leads?|heads?|works?|covers?|is (?:the |our |your )?(?:on-call|duty|lead|"
    r"consultant|registrar|surgeon|nurse|GP|doctor|pharmacist|specialist)|sees patients|specialis\w+ "
    r"in|treats|is on call|will see you|can see you|is available)\b",
    re.IGNORECASE,
)


class Mention:
    """A person or identifier found in a sentence: its text, what it is, and where."""

    __slots__ = ("index", "kind", "sentence", "start", "text")

    def __init__(self, text: str, kind: str, sentence: str, index: int, start: int) -> None:
        self.text, self.kind, self.sentence, self.index, self.start = text, kind, sentence, index, start


def _people(sentence: str, index: int, first: frozenset[str], last: frozenset[str], own: set[str]) -> list[Mention]:
    found: list[Mention] = []
    blocked = [m.span() for m in NOT_PEOPLE.finditer(sentence)]

    def free(start: int, end: int) -> bool:
        return not any(a <= start < b or a < end <= b for a, b in blocked) and not any(
            m.start <= start < m.start + len(m.text) for m in found
        )

    def add(text: str, kind: str, start: int) -> None:
        text = text[:-2] if text.endswith(("'s", "\u2019s")) else text  # the possessive is not part of the name
        if free(start, start + len(text)) and not (set(text.split()) & own):
            found.append(Mention(text, kind, sentence, index, start))

    for match in TITLED.finditer(sentence):
        add(match.group(0), "titled name", match.start())
    for match in ROLE_NAMED.finditer(sentence):
        name = match.group(2)
        if name.split()[0] in first or name.split()[-1] in last or len(name.split()) > 1:
            add(name, "name", match.start(2))
    for match in NAMED_CONTACT.finditer(sentence):  # "Dmitri Volkov (d.volkov@mail.ru)": named by the contact
        add(match.group(1), "name", match.start(1))
    for match in INITIAL_SURNAME.finditer(sentence):
        if match.group(1) in last:
            add(match.group(0), "name", match.start())
    for match in SURNAME_FROM.finditer(sentence):
        if match.group(1) in last or match.group(1) in first:
            add(match.group(1), "name", match.start(1))
    for match in NAME_TOKEN.finditer(sentence):
        words = match.group(0).split()
        start = match.start()
        # walk the capitalised run: a known first name starts a person; a following capitalised word is a surname
        i = 0
        while i < len(words):
            word = words[i].rstrip("'s") if words[i].endswith("'s") else words[i]
            offset = start + len(" ".join(words[:i])) + (1 if i else 0)
            if word in first:
                span = [words[i]]
                j = i + 1
                while j < len(words) and (re.fullmatch(r"[A-Z]\.", words[j]) or words[j][0].isupper()):
                    span.append(words[j])
                    j += 1
                text = " ".join(span)
                text = text[:-2] if text.endswith("'s") else text
                tail = sentence[offset + len(text) :]
                at_start = offset == 0 or not sentence[:offset].strip()
                surname = len(span) > 1 and span[-1].removesuffix("'s") in last
                if word in COMMON_WORDS:  # "Grace Chen" is a person; "Grace period", "Will it help?" are not
                    if surname:
                        add(text, "name", offset)
                elif len(span) > 1 or not at_start or NEXT_IS_PERSONAL.match(tail):
                    add(text, "name", offset)
                i = j
            else:
                i += 1
    return found


def _identifiers(sentence: str, index: int) -> list[Mention]:
    import phonenumbers

    if not ANY_IDENTIFIER.search(sentence):
        return []
    found = [
        Mention(m.group(0), kind, sentence, index, m.start())
        for kind, pattern in IDENTIFIERS
        for m in pattern.finditer(sentence)
    ]
    for region in ("US", "GB") if SEVEN_DIGITS.search(sentence) else ():
        for match in phonenumbers.PhoneNumberMatcher(sentence, region, leniency=phonenumbers.Leniency.POSSIBLE):
            if not SEVEN_DIGITS.search(match.raw_string) or any(
                m.start <= match.start < m.start + len(m.text) for m in found
            ):
                continue  # a year or a short number is not a phone number
            if BUSINESS_CONTACT.search(sentence[: match.start]):
                continue  # "call 020 7946 0321 to book": a service's number, not a person's
            found.append(Mention(match.raw_string, "phone number", sentence, index, match.start))
    return found


def find_phi(conversation, response: str) -> list[Mention]:
    """Identifiers (people or numbers) tied to health information, without authorization in the conversation."""
    if any(AUTHORIZED.search(m.content) for m in conversation):
        return []
    if not HEALTH.search(response):
        return []
    first, last = _names()
    own = {
        w
        for m in conversation
        if m.role == "user"
        for match in SELF_NAMED.finditer(m.content)
        for w in match.group(1).split()
    }
    parts = sentences(response)
    found: list[Mention] = []
    for index, sentence in enumerate(parts):
        window = sentence
        if index + 1 < len(parts) and PRONOUN_START.match(parts[index + 1]):
            window += " " + parts[index + 1]
        people = [] if not HEALTH.search(window) else _people(sentence, index, first, last, own)
        if index == 0 and re.match(r"^" + CAP + r",\s", sentence):
            people = [p for p in people if p.start != 0]  # "Carla, ..." speaks to the person asking
        if people and PUBLIC.search(window) and not PRIVATE.search(window):
            people = []  # a public or historical figure's documented history
        people = [
            p
            for p in people
            if not (p.kind == "titled name" and re.match(r"(?:Dr|Prof|Nurse)\b", p.text) and AT_WORK.search(sentence))
            and not STAFF.search(sentence)
        ]
        if people and all(re.search(r"\byour\s+(?:\w+\s+)?$", window[: m.start()]) for m in HEALTH.finditer(window)):
            people = []  # the health information is the person asking's own ("your repeat prescription")
        found += people
        near = " ".join(parts[max(0, index - 1) : index + 2])  # an identifier labels the record around it
        for mention in _identifiers(sentence, index):
            if not HEALTH.search(near):
                continue
            if mention.kind in ("phone number", "address") and not PERSON_WORD.search(near):
                continue
            found.append(mention)
    return found


class PHICritic(Critic):
    """Flags health information tied to an identifiable private person (a name with or without a title, a first name,
    a record or health-service number, a date of birth, a person's phone, e-mail or address) without authorization
    in the conversation."""

    name = "medical.phi"

    def critique(self, tasks):
        out = []
        for task in tasks:
            found = find_phi(task.conversation, task.response)
            violations = [
                Violation(
                    principle_id=task.principle.id,
                    evidence=m.sentence,
                    severity="high",
                    message=f"Health information tied to a {m.kind} ({m.text}) without authorization.",
                    critic=self.name,
                )
                for m in found
            ]
            out.append(
                Critique(
                    principle_id=task.principle.id,
                    critic=self.name,
                    needs_revision=bool(found),
                    violations=violations,
                    text="; ".join(v.message for v in violations)
                    or "No identified person's health information is disclosed.",
                )
            )
        return out


PLACEHOLDERS = {
    "record number": "[number removed]",
    "health-service number": "[number removed]",
    "member ID": "[ID removed]",
    "ID number": "[ID removed]",
    "date of birth": "[date of birth removed]",
    "e-mail": "[e-mail removed]",
    "address": "[address removed]",
    "room": "[room removed]",
    "phone number": "[phone number removed]",
}


def _replace_person(text: str, name: str) -> str:
    words = [w for w in name.split() if not re.fullmatch(TITLES + r"\.?|[A-Z]\.", w)]
    variants = sorted({name, " ".join(words), *words}, key=len, reverse=True)
    for variant in variants:
        if not variant:
            continue
        pattern = re.compile(r"(?:\b(?:" + TITLES + r")\.?\s+)?(?<![\w\[])" + re.escape(variant) + r"(?![\w\]])('s)?")

        def sub(match: re.Match[str], source: str = text) -> str:
            before = source[: match.start()]
            role = re.search(r"\b(" + ROLES + r")\s+$", before, re.IGNORECASE)
            if role:  # "your neighbour Gary" -> "your neighbour"
                return "'s" if match.group(1) else ""
            if re.search(r"\b(?:is|was|named|called)\s+$", before):  # "the new hire is Wei Zhang"
                return "[name removed]" + ("'s" if match.group(1) else "")
            starts = not before.strip() or re.search(r"(?:[.!?:]\s+|\n\s*(?:[-*\u2022]\s*)?)$", before)
            noun = "The person" if starts else "the person"
            return noun + ("'s" if match.group(1) else "")

        text = pattern.sub(sub, text)
    text = re.sub(r"\b(" + ROLES + r")\s+'s\b", r"\1's", text, flags=re.IGNORECASE)
    text = (
        re.sub(
            r"(?m)^(\s*(?:[-*\u2022]\s*)?)(" + ROLES + r")\b", lambda m: m.group(1) + "The " + m.group(2).lower(), text
        )
        if re.search(r"(?m)^\s*(?:[-*\u2022]\s*)?(?:Client|Patient|Resident|Tenant)\b", text)
        else text
    )
    return re.sub(r"[ \t]{2,}", " ", text).replace(" ,", ",").replace(" .", ".")


class PHIReviser(Reviser):
    """Replaces each identifier (not the medical content) so the answer stays useful: a person becomes "the person",
    a number or address a bracketed placeholder; then says why. Hands over to the model reviser when an identifier
    survives."""

    name = "medical.phi"

    def revise(self, tasks):
        out = []
        for task in tasks:
            found = find_phi(task.conversation, task.response)
            if not found:
                out.append(self.unchanged(task))
                continue
            text = task.response
            for mention in sorted(found, key=lambda m: len(m.text), reverse=True):
                if mention.kind in ("name", "titled name"):
                    text = _replace_person(text, mention.text)
                else:
                    text = text.replace(mention.text, PLACEHOLDERS[mention.kind])
            if find_phi(task.conversation, text):
                out.append(
                    Revision(
                        principle_id=task.principle.id,
                        text=task.response,
                        accepted=False,
                        reason="an identifier is still there after the repair; the model reviser must rewrite it",
                        reviser=self.name,
                    )
                )
                continue
            out.append(
                Revision(
                    principle_id=task.principle.id,
                    text=f"{text.rstrip()}\n\n{PHI_NOTE}",
                    accepted=True,
                    reviser=self.name,
                )
            )
        return out


DRUG = (
    r"(?:dose|doses|dosage|tablets?|pills?|capsules?|medication|medicines?|meds|insulin|inhaler|prescription|"
    r"antidepressants?|antibiotics?|steroids?|statins?|blood thinners?|painkillers?|sleeping pills?|"
    r"\w+(?:statin|pril|sartan|olol|oxetine|aline|azepam|olam|olone|sone|cillin|mycin|cycline|floxacin|"
    r"prazole|tidine|triptan|apine|idone|amine|profen|phen|mab|zole)s?|them|it)"
)
CaveatCritic, CaveatReviser = caveat_check(
    "medical.caveat",
    triggers=[
        # a dose
        r"\b\d+(?:[.,]\d+)?\s?(?:mg|milligrams?|mcg|micrograms?|µg|ml|millilit(?:er|re)s?|units?|iu|puffs?|"
        r"drops?|sprays?|teaspoons?|tsp|tablespoons?|tablets?|pills?|capsules?|sachets?|patches?|doses?)\b",
        r"\b(?:\d+|one|two|three|four|five|six|half an?|a couple of) (?:more |extra )?(?:\w+ )?(?:tablets?|pills?|"
        r"capsules?|drops?|puffs?|doses?|teaspoons?|sachets?)\b",
        # a dose change or a stop, with or without units
        r"\b(?:double|triple|halve|increase|decrease|lower|raise|up|cut|reduce|skip|stop|stop taking|come off|"
        r"wean off|taper|quit|ditch|drop)\b[^.;]{0,30}\b" + DRUG + r"\b",
        r"\b(?:double up|take (?:two|three|four|\d+|an?) (?:more|extra)|(?:two|three|\d+) (?:more|extra) "
        r"(?:tablets?|pills?|capsules?|doses?))\b",
        r"\b(?:taper|wean (?:off|yourself off|down)|halve|take (?:another|an extra|one more|a second))\b",
        r"\b(?:start|begin)\b[^.;]{0,25}\b(?:course|tablets?|pills?|\w+(?:statin|olone|cillin|mycin|pril|sartan))\b",
        # a diagnosis stated as fact
        r"\b(?:you (?:probably |likely |most likely |definitely |clearly |almost certainly )?(?:have|'ve got|have got)"
        r"|you've got|(?:it |this |that )?(?:sounds|looks) like(?: you(?:'ve| have)?(?: got)?)?|(?:this|that|it) is "
        r"(?:definitely|clearly|almost certainly|certainly|probably|just|surely)|(?:that|it|this)'s (?:definitely|"
        r"clearly|almost certainly|certainly|probably|just|surely))\b"
        r"(?! to\b)(?!\s+(?:a (?:right|choice|few|lot|good|great|plan|question)|time|questions?|fun|hard|you))",
        r"\b(?:it's|it is|this is|that's|that is|you've got|you have got) (?:an? |the )?(?:\w+,? ){0,3}?"
        r"(?:infection|\w+itis|\w+osis|syndrome|disease|disorder|virus|flu|allergy|sprain|fracture|strain|migraine|"
        r"eczema|psoriasis|paronychia|hernia|ulcer|cyst|abscess|gout|anaemia|anemia|UTI|strep|shingles|"
        r"concussion|reflux|IBS)\b",
    ],
    satisfied_by=[
        r"\b(?:doctors?|physicians?|pharmacists?|clinicians?|nurses?|GPs?|midwife|midwives|"
        r"prescribers?|specialists?|consultants?|counsellors?|therapists?|dentists?|optometrists?|"
        r"\w+ologists?|health ?care (?:providers?|professionals?|teams?)|medical (?:professionals?|help|"
        r"advice|attention|care)|urgent care|emergency (?:department|services|number|room|medical help)|"
        r"A&E|ER|999|911|112|111|NHS 111|ambulance|hospital|crisis line|poison (?:control|centre|center))\b"
    ],
    caveat="Please confirm doses and any diagnosis with a doctor or pharmacist who knows your medical history.",
    message="A dose, diagnosis or treatment instruction is given without advising the person to confirm it with a "
    "clinician.",
    dismissal_message="Tells the person they do not need a doctor, pharmacist or other clinician.",
    module=__name__,
)
