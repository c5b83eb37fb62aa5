"""Sample corpora anyone can make offline: generated news-style documents full of people, places, organizations and
dates (the same seed gives the same bytes), or the Pile passages of the recorded teacher (`uniner.recorded`).
"""

from __future__ import annotations

import json
import random

from uniner import storage

PEOPLE = [
    "Maria Keller",
    "James Okafor",
    "Chen Wei",
    "Sofia Rossi",
    "Arjun Mehta",
    "Elena Petrova",
    "David Cohen",
    "Aiko Tanaka",
    "Lucas Moreau",
    "Fatima Haddad",
    "Noah Schmidt",
    "Isabel Duarte",
    "Kwame Mensah",
    "Olga Novak",
]
ORGS = [
    "Northwind Energy",
    "the European Space Agency",
    "Helix Biotech",
    "the University of Toronto",
    "Banco Atlantico",
    "the World Health Organization",
    "Orbital Motors",
    "Greenleaf Foods",
    "the Bank of Japan",
    "Siemens",
    "UNESCO",
    "Red Harbor Studios",
    "the National Museum of Kenya",
    "Fjord Shipping",
]
PLACES = [
    "Berlin",
    "Nairobi",
    "São Paulo",
    "Osaka",
    "Toronto",
    "Lyon",
    "Mumbai",
    "Krakow",
    "Lisbon",
    "Accra",
    "the Alps",
    "the Nile",
    "Lake Geneva",
    "Patagonia",
    "Reykjavik",
    "Seoul",
]
PRODUCTS = [
    "the Aurora X2 battery",
    "the Falcon 9 rocket",
    "Windows 11",
    "the Model S",
    "the iPhone 15",
    "Ozempic",
    "the Nimbus drone",
    "the Kestrel tractor",
]
EVENTS = ["the Paris Air Show", "the World Cup", "the Venice Film Festival", "COP28", "the Olympic Games", "Expo 2030"]
MONTHS = [
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
]
SENTENCES = [
    "{person}, the chief executive of {org}, said on {date} that the group would open a new office in {place}.",
    "Engineers at {org} presented {product} at {event}, where {person} called it a turning point.",
    "In {place}, {person} met officials from {org} to discuss funding for a project near {place2}.",
    "{org} reported record revenue for {year}, driven by sales of {product} in {place}.",
    "The delegation led by {person} travelled from {place} to {place2} ahead of {event}.",
    "According to {person}, {org} will invest 40 million euros in {place} before the end of {year}.",
    "Critics in {place} questioned whether {product} was ready, but {person} defended the launch on {date}.",
    "{person} and {person2} of {org} published a study on water quality in {place2} in {month} {year}.",
]


def _sentence(rng: random.Random) -> str:
    person, person2 = rng.sample(PEOPLE, 2)
    place, place2 = rng.sample(PLACES, 2)
    month, year = rng.choice(MONTHS), rng.randint(1990, 2025)
    return rng.choice(SENTENCES).format(
        person=person,
        person2=person2,
        org=rng.choice(ORGS),
        place=place,
        place2=place2,
        product=rng.choice(PRODUCTS),
        event=rng.choice(EVENTS),
        month=month,
        year=year,
        date=f"{rng.randint(1, 28)} {month} {year}",
    )


def document(rng: random.Random) -> str:
    """One document: a few paragraphs of a few sentences each."""
    paragraphs = [" ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(rng.randint(1, 5))]
    return "\n\n".join(paragraphs)


def write_sample_corpus(
    uri: str, *, documents: int, files: int = 4, seed: int = 0, s3_endpoint_url: str = ""
) -> list[str]:
    """Write `documents` generated documents as JSONL ({"id", "text"}) spread over `files` files under `uri`."""
    rng = random.Random(seed)
    folder = storage.locate(uri, s3_endpoint_url=s3_endpoint_url)
    files = max(1, min(files, documents))
    written = []
    for part in range(files):
        count = documents // files + (1 if part < documents % files else 0)
        lines = [
            json.dumps({"id": f"doc-{part:03d}-{i:06d}", "text": document(rng)}, ensure_ascii=False)
            for i in range(count)
        ]
        target = folder.join(f"part-{part:03d}.jsonl")
        storage.write_text(target, "\n".join(lines) + "\n")
        written.append(target.uri)
    return written


def write_recorded_corpus(uri: str, *, documents: int, s3_endpoint_url: str = "") -> str:
    """Write the first `documents` passages of the recorded teacher's sample as JSONL ({"id", "text"}), leaving out
    the held-out evaluation passages."""
    from uniner.recorded import heldout_texts, recorded_passages

    heldout = heldout_texts()
    rows = [{"id": r["id"], "text": r["text"]} for r in recorded_passages() if r["text"] not in heldout][:documents]
    target = storage.locate(uri, s3_endpoint_url=s3_endpoint_url).join("part-000.jsonl")
    storage.write_text(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return target.uri
