"""A recorded teacher: real teacher answers replayed by a local OpenAI-compatible endpoint, so that the offline demo
annotates with real labels through the annotate stage's normal path (actors, rate limit, cache, statuses).

The recording that ships with uniner (`uniner/data/pile_ner_sample/`) holds Pile passages with the entities that
gpt-3.5-turbo-0301 gave for some of their types (Pile-NER-type, CC BY-NC 4.0: research use). A passage is known when
it lies inside a recorded passage (the passages stage may cut a recorded passage in two); the answer lists the
recorded entities that occur in it, in the teacher prompt's tuple format. Any other passage gets a refusal that
says why.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

log = logging.getLogger(__name__)

RECORDING = "pile_ner_sample/recorded.jsonl"
HELDOUT = "pile_ner_sample/pile-ner-heldout.json"
TEACHER = "RECORDED:gpt-3.5-turbo-0301 (Pile-NER-type)"
UNKNOWN = "I'm sorry, but I cannot answer: this recorded teacher holds no answer for this passage."


def recorded_passages() -> list[dict[str, Any]]:
    """The shipped recording: `{"id", "text", "entities": [[text, type], ...]}` per passage."""
    text = resources.files("uniner.data").joinpath(RECORDING).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def heldout_texts() -> set[str]:
    """The passages of the held-out evaluation queries."""
    from uniner.conversations import text_of

    queries = json.loads(resources.files("uniner.data").joinpath(HELDOUT).read_text(encoding="utf-8"))
    return {text_of(query) for query in queries}


def answer_for(passage: str, recording: list[dict[str, Any]]) -> str:
    """The recorded answer for a passage, as the teacher wrote its lists; a refusal for a passage not recorded."""
    source = next((r for r in recording if passage.strip() and passage.strip() in r["text"]), None)
    if source is None:
        return UNKNOWN
    pairs = [(entity, kind) for entity, kind in source["entities"] if entity in passage]
    return "[" + ", ".join(f"({json.dumps(entity)}, {json.dumps(kind)})" for entity, kind in pairs) + "]"


@contextmanager
def recorded_teacher() -> Iterator[str]:
    """Serve the shipped recording on loopback for the duration of the block; yields the base URL."""
    recording = recorded_passages()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recording))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log.info("recorded teacher: replaying %s answers for %d passages", TEACHER, len(recording))
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _handler(recording: list[dict[str, Any]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # requests are counted by the annotate stage
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            prompt = (body.get("messages") or [{}])[-1].get("content", "")
            passage = prompt.split("Passage: ", 1)[-1]
            content = answer_for(passage, recording)
            reply = json.dumps(
                {
                    "id": "recorded",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", TEACHER),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                    ],
                    # The recording kept no token counts: the chars/4 rule, as the stage's own estimates use.
                    "usage": {
                        "prompt_tokens": len(prompt) // 4,
                        "completion_tokens": len(content) // 4,
                        "total_tokens": (len(prompt) + len(content)) // 4,
                    },
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    return Handler


def build_recording(source: str, folder: str, *, passages: int = 300, heldout: int = 40) -> None:
    """Write the shipped recording from Pile-NER-type conversations (`{id, conversations}` with one question per
    type): the first `passages` records, in id order, with at least one entity, as `recorded.jsonl`; and the last
    `heldout` of them as `pile-ner-heldout.json`, evaluation queries (one per passage and asked type, the teacher's
    answer as the reference, `[]` included) that the demo evaluates on and never trains on."""
    from uniner.conversations import dump_records, question_type, text_of

    records = sorted(json.loads(open(source, encoding="utf-8").read()), key=lambda r: r["id"])
    kept = []
    for record in records:
        turns = [turn["value"] for turn in record["conversations"]]
        entities = [
            [entity, question_type(turns[i])]
            for i in range(2, len(turns) - 1, 2)
            for entity in json.loads(turns[i + 1])
        ]
        if entities:
            kept.append((record, {"id": record["id"], "text": text_of(record), "entities": entities}))
        if len(kept) == passages:
            break
    with open(f"{folder}/recorded.jsonl", "w", encoding="utf-8") as out:
        out.write("\n".join(json.dumps(line, ensure_ascii=False) for _, line in kept) + "\n")
    queries = [
        {
            "id": f"{record['id']}-{index // 2 - 1}",
            "conversations": record["conversations"][:2] + record["conversations"][index : index + 2],
        }
        for record, _ in kept[-heldout:]
        for index in range(2, len(record["conversations"]) - 1, 2)
    ]
    with open(f"{folder}/{HELDOUT.rsplit('/', 1)[1]}", "w", encoding="utf-8") as out:
        out.write(dump_records(queries))


if __name__ == "__main__":  # python -m uniner.recorded PILE_NER_TYPE.json uniner/data/pile_ner_sample
    import sys

    build_recording(sys.argv[1], sys.argv[2])
