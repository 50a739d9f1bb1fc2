"""Detokenisation cost per generated token: the incremental :class:`Completion` against decoding
the whole completion on every token (what it did before), on the default model's tokenizer.

Each token costs the streaming path one ``add`` and one ``new_text`` (with a stop string set, so
the stop check runs too); the old path decoded the whole text twice per token (stop check and
text). Random token ids; the texts are checked equal at the end. Prints a table, writes JSON.

    .venv/bin/python benchmarks/detokenize_speed.py [--tokens 500 2000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

from sedac_ray.completion import Completion
from sedac_ray.model.loading import load_tokenizer_and_config


def incremental(tokenizer, ids: list[int]) -> tuple[float, str]:
    completion = Completion(tokenizer, len(ids) + 1, set(), ["\x00never"])
    started = time.perf_counter()
    for token in ids:
        completion.add(token, 1)
        completion.new_text()
    return time.perf_counter() - started, completion.text


def whole_text_each_token(tokenizer, ids: list[int]) -> tuple[float, str]:
    started = time.perf_counter()
    text = ""
    for length in range(1, len(ids) + 1):
        for _ in range(2):  # stop check and text, as Completion did
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
    return time.perf_counter() - started, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="benchmarks/results/detokenize_speed.json")
    args = parser.parse_args()
    tokenizer = load_tokenizer_and_config(args.model)[0]
    rng = random.Random(0)
    rows = []
    for count in args.tokens:
        ids = [rng.randrange(len(tokenizer)) for _ in range(count)]
        new_s, new_text = incremental(tokenizer, ids)
        old_s, old_text = whole_text_each_token(tokenizer, ids)
        if new_text != old_text:
            raise SystemExit(f"texts differ at {count} tokens")
        rows.append(
            {
                "tokens": count,
                "incremental_us_per_token": round(new_s / count * 1e6, 1),
                "whole_decode_us_per_token": round(old_s / count * 1e6, 1),
            }
        )
        print(
            f"{count:6d} tokens: incremental {rows[-1]['incremental_us_per_token']:8.1f} us/token, "
            f"whole decode {rows[-1]['whole_decode_us_per_token']:8.1f} us/token"
        )
    report = {"model": args.model, "machine": platform.platform(), "results": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
