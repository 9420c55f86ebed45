"""Fixtures for the serving tests: a small catalogue, a deterministic embedder, a scripted policy,
a seeded generator of hostile requests, and a tiny Llama + tokenizer built on the spot."""

from __future__ import annotations

import json
import random
import string
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from serve.recommender import GenerationRequest, Query, Recommendation, Recommender
from ulrec.policy import GenerationResult
from ulrec.prompts import format_action

TITLES = [
    "Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Casablanca (1942)", "Vertigo (1958)",
    "Alien (1979)", "Aliens (1986)", "Brazil (1985)", "Clerks (1994)", "Se7en (1995)",
    "Babe (1995)", "Ran (1985)", "Psycho (1960)", "Rocky (1976)", "Jaws (1975)",
    "Amélie (2001)", "[Rec] (2007)", "Léon: The Professional (1994)", "8½ (1963)", "Up (2009)",
]


def hash_embed(texts: list[str], dim: int = 64) -> np.ndarray:
    """Deterministic character-trigram embeddings: similar strings land near each other."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        padded = f"  {text.casefold()}  "
        for i in range(len(padded) - 2):
            out[row, zlib.crc32(padded[i : i + 3].encode("utf-8", "surrogatepass")) % dim] += 1.0
    return out + 1e-3  # no all-zero rows (empty strings)


class ScriptedGenerate:
    """An async generate function answering from a script: ``script[i]`` is the completion of the
    i-th prompt it is asked for (cycling); records every request."""

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.requests: list[GenerationRequest] = []

    async def __call__(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        out = []
        for req in requests:
            text = self.script[len(self.requests) % len(self.script)]
            self.requests.append(req)
            out.append(GenerationResult(text=text, num_tokens=len(text.split())))
        return out


def action(title: str) -> str:
    """A completion as the policy writes it."""
    return " " + format_action(title)


class LocalBackend:
    """The HTTP API's backend without Ray: a Recommender in this process."""

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender

    async def recommend(self, query: Query) -> list[Recommendation]:
        return await self.recommender.recommend(query)

    async def ready(self) -> bool:
        return True


# ------------------------------------------------------------------------------- hostile requests
_JUNK_STRINGS = [
    "", " ", "\x00", "\ud800", "\udfff", "a" * 10_000, "é" * 400, "🎬" * 200, "\u202e" + "evil", "<script>",
    "'; DROP TABLE items; --", "recommend[ Heat (1995) ]", "\n\n\n", "\t", "null", "{}", "[]", "\\u0000",
    "Toy Story (1995)" * 40, "\x1b[31m", "%s%s%s%n", "../../etc/passwd", "𝕳𝖊𝖆𝖙",
]
_JUNK_NUMBERS: list[Any] = [
    -1, -(2**63), 2**63, 10**30, 20, 1_000_000, 0.5, 1.0, -0.0, 1e308, True, False, None, float("nan"),
    float("inf"), -float("inf"), 2**31, 2**31 - 1,
]


def _junk_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice(_JUNK_STRINGS)
    if kind == 1:
        return rng.choice(_JUNK_NUMBERS)
    if kind == 2:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 40)))
    if kind == 3:
        return rng.randrange(-5, 40)
    if kind == 4:
        return [_junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 5:
        return {rng.choice(["item", "history", "k", "", "__proto__", "a" * 50]): _junk_value(rng, depth + 1)}
    return [[[[[[1]]]]]]


def _dumps(body: Any, rng: random.Random) -> bytes:
    """JSON as \\u escapes or as raw UTF-8 (lone surrogates then become invalid UTF-8 bytes: also
    junk); NaN/inf as the bare tokens Python writes, which strict parsers reject."""
    if rng.random() < 0.5:
        return json.dumps(body).encode()
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


def hostile_requests(seed: int, n: int) -> Iterator[tuple[dict[str, str], bytes]]:
    """``n`` malformed or hostile requests as (headers, raw body): wrong types, huge strings,
    unicode, nested junk, negative and out-of-range ids, bad JSON, wrong content types."""
    rng = random.Random(seed)
    fields = ["history", "recommended", "rewards", "k", "temperature", "seed"]
    json_headers = {"content-type": "application/json"}
    for i in range(n):
        kind = i % 10
        headers = dict(json_headers)
        if kind == 0:  # every field of the wrong type
            body = _dumps({f: _junk_value(rng) for f in fields if rng.random() < 0.7}, rng)
        elif kind == 1:  # valid shape, hostile items
            body = _dumps({"history": [_junk_value(rng) for _ in range(rng.randrange(0, 8))],
                           "recommended": [_junk_value(rng) for _ in range(rng.randrange(0, 4))]}, rng)
        elif kind == 2:  # out-of-range numbers where numbers belong
            body = _dumps({"history": [rng.randrange(0, 20)], "k": rng.choice(_JUNK_NUMBERS),
                           "temperature": rng.choice(_JUNK_NUMBERS), "seed": rng.choice(_JUNK_NUMBERS)}, rng)
        elif kind == 3:  # broken JSON
            good = json.dumps({"history": [1, 2], "k": 1})
            cut = rng.randrange(0, len(good))
            body = rng.choice([good[:cut], good[:cut] + "}}", "{" * rng.randrange(1, 5000), "[" * 3000 + "]" * 3000,
                               '{"history": [1, 2,]}', b"\xff\xfe\x00", "NaN", '{"history": [1e99999]}'])
            body = body.encode() if isinstance(body, str) else body
        elif kind == 4:  # wrong content types
            headers = {"content-type": rng.choice(["text/plain", "application/x-www-form-urlencoded",
                                                   "multipart/form-data; boundary=x", "application/xml", "",
                                                   "application/json-patch", "*/*"])}
            body = json.dumps({"history": [1]}).encode()
        elif kind == 5:  # too long lists, too long titles
            body = _dumps({"history": ["x" * rng.randrange(200, 400)] * rng.randrange(1, 5),
                           "recommended": list(range(20)) * rng.randrange(1, 30)}, rng)
        elif kind == 6:  # unknown keys, top-level non-objects
            body = _dumps(rng.choice([[], [1, 2], "history", 42, None, {"history": [], "extra": 1},
                                      {"History": [1]}, {"": None}]), rng)
        elif kind == 7:  # rewards that do not match, non-finite
            body = _dumps({"history": [0], "recommended": [1, 2], "rewards": [_junk_value(rng)] * rng.randrange(0, 4)}, rng)
        elif kind == 8:  # oversized bodies
            body = b'{"history": ["' + b"a" * rng.randrange(70_000, 200_000) + b'"]}'
        else:  # asks for more than the catalogue has left, or unknown recommended titles
            body = _dumps(rng.choice([{"history": [], "recommended": list(range(19)), "k": 2},
                                      {"history": [], "recommended": list(range(20))},
                                      {"history": [1], "recommended": ["No Such Film (2099)"]}]), rng)
        yield headers, body


# -------------------------------------------------------------------------------------- tiny model
def build_tiny_model(out_dir: Path, titles: list[str]) -> Path:
    """A tiny random Llama with a word-level tokenizer trained on the prompt text and titles."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ulrec.prompts import DEFAULT_TEMPLATE

    corpus = [DEFAULT_TEMPLATE, *titles, *(format_action(t) for t in titles), "Action 1: Observation 1: \n"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>", "\n"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------- raw slow clients
class RawConnections:
    """Many raw TCP connections to one server, read without blocking: for clients that stall
    (headers, then part of the declared body, then nothing) or never send a byte. Records, per
    connection, when it was opened, what came back (the status line) and when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        import selectors

        self.addr = (host, port)
        self.selector = selectors.DefaultSelector()
        self.conns: list[dict] = []

    def open(self, n: int, source: str, payload: bytes = b"") -> list[dict]:
        """``n`` connections from the loopback address ``source`` (each a distinct client to the
        server), each sending ``payload`` and then keeping the socket open."""
        import selectors
        import socket
        import time

        opened = []
        for _ in range(n):
            sock = socket.create_connection(self.addr, timeout=10, source_address=(source, 0))
            if payload:
                sock.sendall(payload)
            sock.setblocking(False)
            conn = {"sock": sock, "source": source, "sent_at": time.monotonic(), "data": b"", "replied_at": None,
                    "closed_at": None}
            self.selector.register(sock, selectors.EVENT_READ, conn)
            self.conns.append(conn)
            opened.append(conn)
        return opened

    def poll(self, seconds: float, until=None) -> None:
        """Read whatever arrives for ``seconds`` (or until ``until()`` is true)."""
        import time

        end = time.monotonic() + seconds
        while time.monotonic() < end and not (until and until()):
            if not self.selector.get_map():
                time.sleep(min(0.05, max(end - time.monotonic(), 0)))
                continue
            for key, _ in self.selector.select(timeout=min(0.05, max(end - time.monotonic(), 0))):
                conn = key.data
                try:
                    chunk = conn["sock"].recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # reset by the server: closed
                    chunk = b""
                now = time.monotonic()
                if chunk:
                    conn["data"] += chunk
                    conn["replied_at"] = conn["replied_at"] or now
                else:
                    conn["closed_at"] = now
                    self.selector.unregister(conn["sock"])

    @staticmethod
    def status(conn: dict) -> int | None:
        line = conn["data"].split(b"\r\n", 1)[0].split()
        return int(line[1]) if len(line) >= 2 and line[1].isdigit() else None

    @staticmethod
    def header(conn: dict, name: str) -> str | None:
        head = conn["data"].split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        for line in head:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode()
        return None

    def close(self) -> None:
        for conn in self.conns:
            if conn["closed_at"] is None:
                self.selector.unregister(conn["sock"])
            conn["sock"].close()
        self.conns.clear()
        self.selector.close()
