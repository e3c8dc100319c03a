"""serve-pm throughput: concurrent HTTP clients against one `caictl serve-pm` process.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve_pm.py --preset tiny

Starts the server on a random-weight PM (`caictl init-model --task seq-cls`) at --batch-size 16 and fires
requests from C concurrent clients, each on its own kept-alive connection, N texts a request, --texts texts per
client a round. The texts are
transcripts of the examples' prompts with the constitution's few-shot revisions as responses (tens to hundreds
of tokens). Settings (CLIENTSxTEXTS) take turns, each warmed up first (see interleave.py); one JSON line per
setting gives requests/s and texts/s (medians of the rounds) and the mean texts per forward pass the server
reports, which says how much its batching gathered. 1x1 (one client, one text a request) is the baseline:
nothing to batch. Right answers under load, dead clients and a slow judge: bench_serve_pm_load.py.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from interleave import interleave, throughputs, timed

from caictl.data.constitution import load as load_constitution
from caictl.data.reading import read_prompts
from caictl.models.pm import conversation_text
from caictl.stages import init_model as tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(tiny.PRESETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--settings", default="1x1,16x1,16x16", help="CLIENTSxTEXTS per request, comma-separated")
    parser.add_argument("--texts", type=int, default=32, help="texts each client sends a round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each setting once per round)")
    args = parser.parse_args()
    settings = [tuple(int(n) for n in s.split("x")) for s in args.settings.split(",")]

    texts = transcripts()
    with tempfile.TemporaryDirectory() as folder:
        pm = tiny.run(tiny.InitModelConfig(out=Path(folder) / "pm", preset=args.preset, task="seq-cls"))
        server, (host, port) = start_server(["--pm", str(pm), "--batch-size", str(args.batch_size)],
                                            Path(folder) / "serve-pm.stderr")
        try:
            passes = {setting: [0, 0] for setting in settings}  # texts, forward passes over the timed rounds

            def side(setting, texts_each=args.texts, counted=True):
                clients, per_request = setting
                requests = -(-texts_each // per_request)

                def run() -> float:
                    before = health(host, port)
                    seconds = timed(lambda: fire(host, port, texts, clients, requests, per_request))
                    after = health(host, port)
                    if counted:
                        passes[setting][0] += after["texts"] - before["texts"]
                        passes[setting][1] += after["forward_passes"] - before["forward_passes"]
                    return seconds

                return run

            seconds = interleave({setting: side(setting) for setting in settings}, args.rounds,
                                 warm_ups={setting: side(setting, setting[1], counted=False) for setting in settings})
        finally:
            server.terminate()
            server.wait(timeout=60)

    for setting in settings:
        clients, per_request = setting
        requests = clients * -(-args.texts // per_request)
        rates = throughputs(seconds, {setting: requests})
        print(json.dumps({
            "stage": "serve-pm",
            "preset": args.preset,
            "batch_size": args.batch_size,
            "clients": clients,
            "texts_per_request": per_request,
            "requests_per_round": requests,
            "rounds": args.rounds,
            "requests_per_s": round(rates[setting], 1),
            "texts_per_s": round(rates[setting] * per_request, 1),
            "texts_per_forward_pass": round(passes[setting][0] / max(passes[setting][1], 1), 2),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }), flush=True)


def transcripts() -> list[str]:
    prompts = read_prompts(EXAMPLES / "red-team.jsonl") + read_prompts(EXAMPLES / "helpful.jsonl")
    answers = [shot.revision for shot in load_constitution("harmless").few_shot]
    return [conversation_text(p.messages, answers[i % len(answers)]) for i, p in enumerate(prompts)]


def start_server(options: list[str], log: Path):
    """`caictl serve-pm OPTIONS` on a free port, once it listens: (the process, (host, port))."""
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "caictl", "serve-pm", "--port", "0", *options],
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while not (found := re.search(r"listening on http://([\d.]+):(\d+)/", log.read_text())):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"serve-pm did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return server, (found.group(1), int(found.group(2)))


def fire(host: str, port: int, texts: list[str], clients: int, requests: int, per_request: int) -> None:
    """Every client sends its requests one after another on one connection; all clients start together."""
    start, failures = threading.Barrier(clients), []

    def client(c: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=600)
        start.wait()
        for r in range(requests):
            first = (c * requests + r) * per_request
            batch = [texts[(first + k) % len(texts)] for k in range(per_request)]
            connection.request("POST", "/get_reward", json.dumps({"query": batch}),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
            if response.status != 200:
                failures.append(answer)
        connection.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, first: {failures[0][:300]}")


def health(host: str, port: int) -> dict:
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", "/health")
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return answer


if __name__ == "__main__":
    main()
