"""Does a server request wait for another? Request B alone, then B sent 3 s after request A (A still running).

    flock /tmp/moa-heavy.lock .venv/bin/python scripts/bench_server.py --runs 3

`moa-local serve`'s app on loopback (uvicorn in a thread), the tiny recipe on vLLM, greedy, the official `openai`
client. B alone is timed first; then A is sent and B follows ``--delay`` seconds later; B's latency in the second
case over B alone is the ratio (1.0: B never waited for A). Each case runs ``--runs`` times, medians count.
Prints a table and a JSON line with ``b_with_a_over_b_alone``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

A = "Write a short story about a lighthouse keeper who finds a message in a bottle."
B = "Name three uses of copper."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--delay", type=float, default=3.0)
    args = ap.parse_args()

    from openai import OpenAI

    import moa_local
    from moa_local.server.background import BackgroundServer
    from moa_local.server.openai import create_app

    with moa_local.load(args.recipe, temperature=0.0) as moa, BackgroundServer(create_app(moa)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=1200)

        def ask(text: str) -> float:
            start = time.perf_counter()
            client.chat.completions.create(model=args.recipe, messages=[{"role": "user", "content": text}])
            return time.perf_counter() - start

        ask("Hello.")  # warm up both engines
        alone, with_a, a_times = [], [], []
        for _ in range(args.runs):
            alone.append(ask(B))
            got: dict[str, float] = {}
            thread = threading.Thread(target=lambda got=got: got.__setitem__("a", ask(A)))
            thread.start()
            time.sleep(args.delay)
            with_a.append(ask(B))
            thread.join()
            a_times.append(got["a"])
            print(f"B alone {alone[-1]:.1f} s, B after A {with_a[-1]:.1f} s (A {got['a']:.1f} s)", flush=True)
    ratio = statistics.median(with_a) / statistics.median(alone)
    print(f"\n| case | median s | runs |\n|---|---:|---:|\n| B alone | {statistics.median(alone):.2f} | {args.runs} |")
    print(f"| B sent {args.delay:g} s after A | {statistics.median(with_a):.2f} | {args.runs} |")
    print(f"| A (with B) | {statistics.median(a_times):.2f} | {args.runs} |")
    print(json.dumps({"b_alone_s": round(statistics.median(alone), 2), "b_with_a_s": round(statistics.median(with_a), 2),
                      "b_with_a_over_b_alone": round(ratio, 3)}))


if __name__ == "__main__":
    main()
