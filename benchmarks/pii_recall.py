"""How much personal data the edge's pseudonymizer hides, and how much ordinary chat it
touches: main's detector (regexes + census names, loaded from git at OLD_COMMIT) against
the current one (edge_runtime.pii), in one run.

    PYTHONPATH=. python benchmarks/pii_recall.py            # ~1,900 sentences + 2,000 chat messages
    PYTHONPATH=. python benchmarks/pii_recall.py --quick    # a tenth of each

The set is built offline with a fixed seed: presidio-evaluator's sentence templates and
its 3,000 international fake identities (names, street addresses, phones, birthdays),
`faker` for card numbers, IBANs, e-mails and addresses in seven locales, and hand-made
contexts for names at a sentence's start, mid-sentence, in lower case, after a title and
in full.  A planted value counts as hidden when none of its letters or digits reaches
the server (every one lies in a replaced span).  Ordinary words replaced: the share of
words in chitchat-dataset messages that lie in a replaced span.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import random
import re
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OLD_COMMIT = "5a6bce2"  # main when issue 29 was filed
KEY = b"b" * 32
SEED = 29
LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_PT")

# Hand-made contexts: {first} {last} {full} {title}.
NAME_CONTEXTS = {
    "name_start": ["{first} said she would call me back tomorrow.", "{first} is coming to the party tonight.",
                   "{first} asked me to send the report before Friday.", "{first} and I went hiking last weekend.",
                   "{first}, can you help me with this?", "{first} thinks the movie was too long."],
    "name_mid": ["I had lunch with {first} yesterday.", "Can you write a birthday message for {first}?",
                 "My sister {first} lives near the station.", "Yesterday {first} told me the news.",
                 "Please remind {first} about the meeting.", "We should invite {first} to dinner."],
    "name_lower": ["i had lunch with {first_l} yesterday", "can you write a poem for {first_l}",
                   "my friend {first_l} {last_l} is sick", "{first_l} said it was fine",
                   "tell {first_l} i said hi", "is {first_l} coming tonight?"],
    "name_title": ["Please ask {title} {last} to call me back.", "I have an appointment with {title} {last} on Monday.",
                   "{title} {last} was my teacher in school.", "Dear {title} {last}, thank you for your letter.",
                   "The letter was signed by {title} {last}.", "Is {title} {last} available today?"],
    "name_full": ["{first} {last} is my neighbour.", "I met {first} {last} at the conference.",
                  "Could you draft an email to {first} {last} about the invoice?", "My name is {first} {last}.",
                  "Send it to {first} {last} please.", "{first} {last} called about the car."],
}
VALUE_CONTEXTS = {
    "phone": ["Call me at {v} after six.", "My number is {v}", "You can reach {name} on {v}.", "phone: {v}",
              "text me on {v} when you land", "Her mobile is {v}, his is unknown."],
    "card": ["My card number is {v}.", "Charge it to {v} please", "card {v} was declined", "I paid with {v} yesterday."],
    "iban": ["Please transfer the money to {v}.", "My IBAN is {v}", "IBAN: {v}", "wire it to {v} by Monday"],
    "email": ["Write to me at {v}.", "my email is {v}", "Send the file to {v} please", "contact: {v}"],
    "address": ["I live at {v}.", "Please send the package to {v}, thanks.", "My new address is {v}",
                "We moved to {v} last year.", "ship to {v}", "The party is at {v} on Saturday."],
    "dob": ["I was born on {v}.", "My date of birth is {v}.", "DOB: {v}", "born {v} in a small town",
            "{name} (born {v}) joined us", "my birthday is {v}"],
    "digits": ["My order number is {v}.", "The code is {v}", "Room {v}, second floor.", "account {v}"],
}
TITLES = ["Mr.", "Mrs.", "Ms.", "Dr.", "Mr", "Mrs", "Dr", "Professor"]

# A held-out split, written before the detector was tuned on the set above: other
# contexts, and identities from other generators (faker's locales that neither the set
# above nor the detector's name list draws on).
HELDOUT_LOCALES = ("pl_PL", "sv_SE", "cs_CZ", "fi_FI", "da_DK", "no_NO", "hu_HU", "hr_HR", "sk_SK", "sl_SI", "en_IE",
                   "en_NZ", "pt_BR", "ro_RO")
HELDOUT_NAME_CONTEXTS = {
    "name_start": ["{first} wants to move the meeting to Thursday.", "{first} just sent me the photos.",
                   "{first} was right about the weather.", "{first}: are you free tonight?"],
    "name_mid": ["Do you think {first} would like this gift?", "I'm worried about {first} lately.",
                 "Our new colleague {first} starts on Monday.", "Last night {first} cooked dinner for everyone."],
    "name_lower": ["what should i get {first_l} for christmas", "{first_l} wants pizza again",
                   "remind me to call {first_l} tomorrow", "me and {first_l} are going out"],
    "name_title": ["I spoke to {title} {last} this morning.", "{title} {last} prescribed me antibiotics.",
                   "Appointment with {title} {last} moved to 3pm."],
    "name_full": ["Please add {first} {last} to the guest list.", "Is {first} {last} still working there?",
                  "{first} {last} wrote the report.", "the invoice is for {first} {last}"],
}
HELDOUT_VALUE_CONTEXTS = {
    "address": ["Our office moved to {v}.", "Deliver to {v} before noon.", "The flat at {v} is for rent.",
                "home address: {v}"],
    "phone": ["Ring me on {v} tomorrow.", "mobile {v}", "The number was {v}, I think."],
    "dob": ["She was born {v}.", "Birthday: {v}", "his date of birth is {v}", "d.o.b. {v}"],
}


def faker_pool(seed: int):
    from faker import Faker

    fakers = {loc: Faker(loc) for loc in LOCALES}
    for i, f in enumerate(fakers.values()):
        f.seed_instance(seed + i)
    return fakers


def identities() -> list[dict]:
    spec = importlib.util.find_spec("presidio_evaluator")
    path = Path(list(spec.submodule_search_locations)[0]) / "data_generator" / "raw_data" / "FakeNameGenerator.com_3000.csv"
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))))


def templates() -> list[str]:
    spec = importlib.util.find_spec("presidio_evaluator")
    path = Path(list(spec.submodule_search_locations)[0]) / "data_generator" / "raw_data" / "templates.txt"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.strip().replace("\\n", "\n") for line in lines if line.strip()]  # line breaks are written "\n"


def date_formats(rng: random.Random, month: int, day: int, year: int) -> str:
    names = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December"]
    return rng.choice([f"{month}/{day}/{year}", f"{day:02d}.{month:02d}.{year}", f"{year}-{month:02d}-{day:02d}",
                       f"{names[month - 1]} {day}, {year}", f"{day} {names[month - 1]} {year}",
                       f"{day}/{month}/{year}", f"{names[month - 1][:3]} {day} {year}"])


def phone_formats(rng: random.Random, person: dict, fakers) -> str:
    national = person["TelephoneNumber"]
    digits = re.sub(r"\D", "", national)
    return rng.choice([
        national, f"+{person['TelephoneCountryCode']} {national.lstrip('0')}", fakers[rng.choice(LOCALES)].phone_number(),
        fakers["en_US"].phone_number(), " ".join(digits[i : i + 2] for i in range(0, len(digits), 2)),
        f"({digits[:3]}) {digits[3:6]}-{digits[6:]}" if len(digits) >= 9 else national,
    ])


def build_set(n_per_context: int, seed: int) -> list[tuple[str, str, str]]:
    """(kind, sentence, planted value) triples."""
    rng = random.Random(seed)
    fakers = faker_pool(seed)
    people = identities()
    rng.shuffle(people)
    out = []
    person = iter(people * 4)

    def name_of(p):
        return p["GivenName"], p["Surname"]

    for kind, contexts in NAME_CONTEXTS.items():
        for _ in range(n_per_context):
            p = next(person)
            first, last = name_of(p)
            title = rng.choice(TITLES)
            sentence = rng.choice(contexts).format(first=first, last=last, first_l=first.lower(), last_l=last.lower(), title=title)
            planted = {"name_start": first, "name_mid": first, "name_lower": first.lower(), "name_title": last,
                       "name_full": f"{first} {last}"}[kind]
            out.append((kind, sentence, planted))
    for kind, contexts in VALUE_CONTEXTS.items():
        for _ in range(n_per_context):
            p = next(person)
            f = fakers[rng.choice(LOCALES)]
            if kind == "phone":
                v = phone_formats(rng, p, fakers)
            elif kind == "card":
                v = fakers["en_US"].credit_card_number()
                if rng.random() < 0.5:
                    v = " ".join(v[i : i + 4] for i in range(0, len(v), 4))
            elif kind == "iban":
                v = f.iban()
                if rng.random() < 0.5:
                    v = " ".join(v[i : i + 4] for i in range(0, len(v), 4))
            elif kind == "email":
                v = rng.choice([p["EmailAddress"], f.email(), fakers["en_US"].free_email()])
            elif kind == "address":
                v = rng.choice([p["StreetAddress"], f.street_address(), fakers["en_US"].street_address()])
            elif kind == "dob":
                m, d, y = map(int, p["Birthday"].split("/"))
                v = date_formats(rng, m, d, y)
            else:
                v = str(rng.randrange(10 ** rng.randint(2, 8), 10 ** rng.randint(9, 12)))
            out.append((kind, rng.choice(contexts).format(v=v, name=" ".join(name_of(p))), v))
    # presidio-evaluator's own templates, for their variety of contexts.
    fields = {"person": "name_full", "name": "name_full", "first_name": "name_mid", "last_name": "name_title",
              "phone_number": "phone", "credit_card_number": "card", "iban": "iban", "email": "email", "address": "address",
              "date_of_birth": "dob"}
    usable = [t for t in templates() if any("{{" + k + "}}" in t for k in fields)]
    for t in usable * max(1, n_per_context // 20):
        p = next(person)
        f = fakers[rng.choice(LOCALES)]
        planted = []

        def fill(m):
            key = m.group(1)
            value = {"person": f"{p['GivenName']} {p['Surname']}", "name": f"{p['GivenName']} {p['Surname']}",
                     "first_name": p["GivenName"], "last_name": p["Surname"], "phone_number": p["TelephoneNumber"],
                     "credit_card_number": fakers["en_US"].credit_card_number(), "iban": f.iban(), "email": p["EmailAddress"],
                     "address": p["StreetAddress"], "date_of_birth": p["Birthday"]}.get(key)
            if value is None:
                value = str(getattr(f, key)()) if hasattr(f, key) else "something"
            elif key in fields:
                planted.append((fields[key], value))
            return value

        sentence = re.sub(r"\{\{(\w+)\}\}", fill, t)
        for k, v in planted:
            out.append(("template:" + k.split("_")[0], sentence, v))
    return out


def build_heldout(n_per_context: int, seed: int) -> list[tuple[str, str, str]]:
    """(kind, sentence, planted value) triples of the held-out split."""
    from faker import Faker

    rng = random.Random(seed + 1)
    fakers = {loc: Faker(loc) for loc in HELDOUT_LOCALES}
    for i, f in enumerate(fakers.values()):
        f.seed_instance(seed + 100 + i)
    out = []
    for kind, contexts in HELDOUT_NAME_CONTEXTS.items():
        for _ in range(n_per_context):
            f = fakers[rng.choice(HELDOUT_LOCALES)]
            first, last = f.first_name().split()[0], f.last_name().split()[0]
            sentence = rng.choice(contexts).format(first=first, last=last, first_l=first.lower(), title=rng.choice(TITLES))
            planted = {"name_lower": first.lower(), "name_title": last, "name_full": f"{first} {last}"}.get(kind, first)
            out.append(("heldout:" + kind, sentence, planted))
    for kind, contexts in HELDOUT_VALUE_CONTEXTS.items():
        for _ in range(n_per_context):
            f = fakers[rng.choice(HELDOUT_LOCALES)]
            if kind == "address":
                v = f.street_address().replace("\n", ", ")
            elif kind == "phone":
                v = f.phone_number()
            else:
                d = f.date_of_birth(minimum_age=18, maximum_age=90)
                v = date_formats(rng, d.month, d.day, d.year)
            out.append(("heldout:" + kind, rng.choice(contexts).format(v=v), v))
    return out


def chat_messages(n: int, seed: int) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from audit.data import _package_dir

    data = json.loads((_package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json").read_text())
    messages = [" ".join(u["text"] for u in turn) for key in sorted(data) for turn in data[key]["messages"]]
    return random.Random(seed).sample(messages, n)


def old_pseudonyms():
    """main's edge_runtime.pseudonyms at OLD_COMMIT, as a module."""
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:edge_runtime/pseudonyms.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType("old_pseudonyms")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, "old_pseudonyms.py", "exec"), module.__dict__)
    return module.Pseudonyms


def hidden(text: str, value: str, spans) -> bool:
    at = text.find(value)
    if at < 0:
        raise ValueError(f"{value!r} not in {text!r}")
    covered = bytearray(len(text))
    for s, e in spans:
        covered[s:e] = b"\1" * (e - s)
    return all(covered[at + i] or not c.isalnum() for i, c in enumerate(value))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def evaluate(make, sentences, chat) -> dict:
    hits: dict[str, list[bool]] = {}
    t0 = time.perf_counter()
    for kind, text, value in sentences:
        spans = [(r.start, r.end) for r in make().replacements(text)]
        hits.setdefault(kind, []).append(hidden(text, value, spans))
    ms_set = (time.perf_counter() - t0) / len(sentences) * 1000
    words = replaced = 0
    t0 = time.perf_counter()
    examples = []
    for text in chat:
        spans = [(r.start, r.end) for r in make().replacements(text)]
        for m in re.finditer(r"[^\W_]+", text):
            words += 1
            if any(s < m.end() and m.start() < e for s, e in spans):
                replaced += 1
                if len(examples) < 40:
                    examples.append(m.group())
    ms_chat = (time.perf_counter() - t0) / len(chat) * 1000
    recall = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    return {"recall": recall, "counts": {k: len(v) for k, v in sorted(hits.items())}, "chat_words_replaced": replaced / words,
            "chat_words": words, "ms_per_sentence": ms_set, "ms_per_chat_message": ms_chat, "replaced_examples": examples}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tenth of the set")
    ap.add_argument("--out", default=str(RESULTS / "pii_recall.json"))
    ap.add_argument("--misses", type=int, default=0, help="print this many missed sentences per kind (new detector)")
    args = ap.parse_args(argv)
    per, n_chat = (12, 200) if args.quick else (120, 2000)
    sentences = build_set(per, SEED) + build_heldout(per // 2, SEED)
    chat = chat_messages(n_chat, SEED)

    before = rss_mb()
    t0 = time.perf_counter()
    from edge_runtime.pseudonyms import Pseudonyms

    Pseudonyms(KEY)  # loads the detector once
    load_s = time.perf_counter() - t0
    resident = rss_mb() - before
    new = evaluate(lambda: Pseudonyms(KEY), sentences, chat)
    new.update(load_s=load_s, resident_mb=resident)
    Old = old_pseudonyms()
    old = evaluate(lambda: Old(KEY), sentences, chat)

    kinds = list(new["recall"])
    print(f"{len(sentences)} sentences, {len(chat)} chat messages ({new['chat_words']} words)\n")
    print(f"{'hidden':<22}{'n':>6}{'main':>9}{'now':>9}")
    for k in kinds:
        print(f"{k:<22}{new['counts'][k]:>6}{old['recall'][k]:>9.1%}{new['recall'][k]:>9.1%}")
    print(f"{'chat words replaced':<28}{old['chat_words_replaced']:>9.2%}{new['chat_words_replaced']:>9.2%}")
    print(f"{'ms per sentence':<28}{old['ms_per_sentence']:>9.2f}{new['ms_per_sentence']:>9.2f}")
    print(f"{'ms per chat message':<28}{old['ms_per_chat_message']:>9.2f}{new['ms_per_chat_message']:>9.2f}")
    print(f"\ndetector load {load_s:.1f} s, resident memory +{resident:.0f} MB")
    print("chat words replaced (new):", ", ".join(new["replaced_examples"]))
    if args.misses:
        for kind in kinds:
            missed = [(t, v) for k, t, v in sentences if k == kind
                      and not hidden(t, v, [(r.start, r.end) for r in Pseudonyms(KEY).replacements(t)])]
            for t, v in missed[: args.misses]:
                print(f"MISS {kind}: {v!r} in {t!r}")
    out = {"sentences": len(sentences), "chat_messages": len(chat), "seed": SEED, "old_commit": OLD_COMMIT, "old": old, "new": new}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
