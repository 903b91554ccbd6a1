"""Load test of `lorafit serve`: mixed adapters batched vs one adapter vs per-request adapter switching.

One process, one run, loopback only. A Llama-shaped model with random weights (hidden 384, 4
layers, a byte-level BPE tokenizer trained here) and 32 adapters on disk (r=16, all-linear),
served by :class:`lorafit.serve.Server` under uvicorn in a thread. N concurrent clients
(httpx, asyncio, in a child process: they do not share the server's interpreter lock) send
completion requests (prompts of 4-24 words, exactly ``--max-tokens`` new
tokens each: EOS is disabled so every mode does the same work). Three modes, rotated round by
round so drift on a shared machine hits them alike:

- ``mixed``: each request names one of 8 adapters at random - rows of one forward use
  different adapters (``adapter_batch``);
- ``single``: every request names the same adapter (the same batched server);
- ``switching``: the baseline without batching - one request at a time, ``lorafit.set_adapter``
  before its forward (``--max-batch 1``, the model run plainly).

Reported per mode: generated tokens/s (wall clock: what a client sees), tokens per CPU second
of the server process (the cost, less sensitive to other load on a shared machine), requests/s,
p50/p99 latency, peak RSS; the ratios pooled, as the median of per-round ratios, and per CPU second. Then the memory
of a resident adapter vs its file size: RSS growth per adapter, and the bytes of the distinct
storages behind the adapters and the layers' stacks (the server batches with ``share_weights``,
so the stacks ARE the adapters' storage: one copy), and a soak
of ``--soak`` short requests over all 32 adapters with ``--max-resident 8`` (a load and an
eviction for most batches), RSS sampled along the way: it must stay flat.

    python benchmarks/serve_load.py                       # ~3 minutes on 2 CPU cores
    python benchmarks/serve_load.py --device cuda --out "$OUT"
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

WORDS = ["the", "film", "was", "great", "awful", "meal", "hotel", "trip", "really", "show", "book", "game",
         "lovely", "boring", "phone", "class", "concert", "and", "then", "we", "left", "early", "again"]


async def load(url, clients: int, per_client: int, adapters: list[str], max_tokens: int, seed: int):
    """``clients`` concurrent clients, ``per_client`` requests each; returns (latencies, tokens, wall seconds)."""
    import httpx

    rng = random.Random(seed)
    plans = [[(rng.choice(adapters), " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))))
              for _ in range(per_client)] for _ in range(clients)]
    latencies, tokens = [], 0

    async def client(plan):
        nonlocal tokens
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            for adapter, prompt in plan:
                t0 = time.perf_counter()
                r = await c.post("/v1/completions", json={"model": adapter, "prompt": prompt,
                                                          "max_tokens": max_tokens, "temperature": 0})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{adapter}: {r.status_code} {r.text}")
                tokens += r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    await asyncio.gather(*(client(p) for p in plans))
    return latencies, tokens, time.perf_counter() - t0


def _client_mode() -> None:
    """``serve_load.py --client SPEC``: one load from a child process, before torch is imported (fast start)."""
    c = json.loads(sys.argv[2])
    lat, toks, secs = asyncio.run(load(c["url"], c["clients"], c["per_client"], c["adapters"], c["max_tokens"],
                                       c["seed"]))
    print(json.dumps({"latencies": lat, "tokens": toks, "seconds": secs}))
    sys.exit(0)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--client":
    _client_mode()

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import lorafit  # noqa: E402
from lorafit.serve import Background, Limits, Server  # noqa: E402
from lorafit.serve.engine import release_freed_memory  # noqa: E402
from lorafit.tree import lora_layers  # noqa: E402


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def held_bytes(model) -> int:
    """Bytes of every distinct storage behind the adapters' parameters and the layers' stacks.

    With ``share_weights`` the parameters are views of the stacks, so each storage counts once;
    without it, parameters and stacks are two copies.
    """
    seen = {}
    for _, layer in lora_layers(model):
        tensors = [p for ad in layer.adapters.values() for p in ad.parameters()]
        tensors += [t for entry in layer.stack_cache.values() for t in _tensors(entry[2])]
        for t in tensors:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class PeakRSS:
    """Samples this process's RSS every 10 ms between start() and stop(); ``peak`` in bytes."""

    def __init__(self):
        self.peak, self._stop, self._t = 0, threading.Event(), None

    def start(self):
        self.peak, self._stop = rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def build(directory: Path, n_adapters: int, rank: int):
    """A random-weight Llama + tokenizer in ``directory/base``; ``n_adapters`` adapters in ``directory/adapters``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(directory / "base")
    tok.save_pretrained(directory / "base")
    donor = copy.deepcopy(model)
    lorafit.inject(donor, lorafit.LoraConfig(r=rank, alpha=2 * rank, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    for i in range(n_adapters):
        with torch.no_grad():
            for _, layer in lora_layers(donor):
                ad = layer.adapters["default"]
                ad.lora_B.copy_(torch.randn(ad.lora_B.shape, generator=g) * 0.02)
        lorafit.save_adapter(donor, directory / "adapters" / f"ad{i:02d}")
    return model, tok


def switching(gen, model):
    """Generator._forward replaced by the unbatched baseline: set_adapter, then the plain model."""
    def forward(keys, **inputs):
        (key,) = set(keys)  # --max-batch 1: one request, one adapter
        if key is None:
            with lorafit.disabled(model):
                out = model(**inputs, use_cache=True)
        else:
            lorafit.set_adapter(model, key)
            out = model(**inputs, use_cache=True)
        return (out.cache if "cache" in out else out.past_key_values), out.logits[:, -1]
    return forward


def remote_load(url, clients: int, per_client: int, adapters: list[str], max_tokens: int, seed: int):
    """:func:`load` run in a child process (this file with ``--client``): (latencies, tokens, seconds)."""
    spec = json.dumps({"url": url, "clients": clients, "per_client": per_client, "adapters": adapters,
                       "max_tokens": max_tokens, "seed": seed})
    out = subprocess.run([sys.executable, __file__, "--client", spec], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load client failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["latencies"], r["tokens"], r["seconds"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=4, help="requests per client per round and mode")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--soak", type=int, default=2000, help="soak requests (max_tokens 2, all 32 adapters)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model, tok = build(tmp, 32, 16)
    model.to(args.device)
    adapter_dir = tmp / "adapters"
    file_bytes = sum(p.stat().st_size for p in (adapter_dir / "ad00").iterdir())
    server = Server(model, tok, adapter_dir, base_name="base", max_resident=8, max_batch=args.clients,
                    window_ms=5, limits=Limits(max_tokens=64, max_inputs=4))
    server.backend.gen.eos_ids = set()  # every request generates exactly max_tokens
    batched_forward = server.backend.gen._forward
    chosen = [f"ad{i:02d}" for i in range(8)]
    modes = {"mixed": chosen, "single": chosen[:1], "switching": chosen}
    res = {m: {"lat": [], "tokens": 0, "seconds": 0.0, "cpu": 0.0, "peak_rss": 0, "rounds": []} for m in modes}
    with Background(server.app()) as bg:
        for _ in range(3):  # warm-up on the base: the allocations of a forward are made before measuring
            asyncio.run(load(bg.url, args.clients, 1, ["base"], args.max_tokens, seed=99))
        gc.collect()
        release_freed_memory()  # the server trims after batches that load; measure from a trimmed heap too
        rss0 = rss()
        for name in chosen:  # one adapter per request; each batch stacks every resident adapter
            asyncio.run(load(bg.url, 1, 1, [name], 2, seed=98))
        gc.collect()
        release_freed_memory()
        per_adapter_rss = (rss() - rss0) / len(chosen)
        param_bytes = statistics.mean(r.bytes for r in server.store.resident.values())
        asyncio.run(load(bg.url, args.clients, 2, chosen, 2, seed=97))  # a mixed batch: stacks of up to 8 adapters
        stacks = sum(t.numel() * t.element_size() for _, layer in lora_layers(model) for entry in
                     layer.stack_cache.values() for t in _tensors(entry[2]))
        held = held_bytes(model)
        order = list(modes)
        for rnd in range(args.rounds):
            for mode in order[rnd % 3:] + order[: rnd % 3]:
                if mode == "switching":
                    server.engine.max_batch, server.backend.gen._forward = 1, switching(server.backend.gen, model)
                else:
                    server.engine.max_batch, server.backend.gen._forward = args.clients, batched_forward
                sampler, cpu0 = PeakRSS().start(), time.process_time()
                lat, toks, secs = remote_load(bg.url, args.clients, args.per_client, modes[mode],
                                              args.max_tokens, seed=rnd)
                cpu = time.process_time() - cpu0  # the server process's CPU seconds (all its threads)
                res[mode]["peak_rss"] = max(res[mode]["peak_rss"], sampler.stop())
                res[mode]["cpu"] += cpu
                res[mode]["rounds"].append(toks / secs)
                res[mode]["lat"] += lat
                res[mode]["tokens"] += toks
                res[mode]["seconds"] += secs
                print(f"round {rnd} {mode:9s} {toks / secs:8.1f} tok/s  {toks / cpu:8.1f} tok/cpu-s  "
                      f"p50 {pct(lat, .5) * 1e3:7.1f} ms", flush=True)
        server.engine.max_batch, server.backend.gen._forward = args.clients, batched_forward
        # soak: every adapter, 8 resident: most batches load one and evict one
        all32 = [f"ad{i:02d}" for i in range(32)]
        samples, t0 = [], time.perf_counter()
        chunk = max(args.soak // (10 * args.clients), 1)
        done = 0
        while done < args.soak:
            remote_load(bg.url, args.clients, chunk, all32, 2, seed=1000 + done)
            done += args.clients * chunk
            gc.collect()
            samples.append((done, rss()))
            print(f"soak {done} requests, RSS {samples[-1][1] / 2**20:.0f} MiB", flush=True)
        soak_s = time.perf_counter() - t0
        loads, evictions = server.metrics.loads, server.metrics.evictions
    rows = {}
    for m, r in res.items():
        rows[m] = {"tokens_per_s": r["tokens"] / r["seconds"], "requests_per_s": len(r["lat"]) / r["seconds"],
                   "tokens_per_server_cpu_s": r["tokens"] / r["cpu"], "tokens_per_s_by_round": r["rounds"],
                   "p50_ms": pct(r["lat"], 0.5) * 1e3, "p99_ms": pct(r["lat"], 0.99) * 1e3,
                   "requests": len(r["lat"]), "peak_rss_bytes": r["peak_rss"]}
    first_q = max(v for n, v in samples[: max(len(samples) // 4, 1)])
    result = {
        "benchmark": "serve_load", "date": date.today().isoformat(), "device": args.device,
        "machine": platform.platform(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "lorafit": lorafit.__version__, "uvicorn": __import__("uvicorn").__version__,
                     "starlette": __import__("starlette").__version__},
        "setup": {"model": "Llama hidden 384, 4 layers, 6 heads (2 kv), vocab 512, random weights",
                  "adapters_on_disk": 32, "adapters_in_load": 8, "rank": 16, "targets": "all-linear",
                  "clients": args.clients, "per_client_per_round": args.per_client, "rounds": args.rounds,
                  "max_tokens": args.max_tokens, "max_batch": args.clients, "window_ms": 5, "max_resident": 8},
        "modes": rows,
        "ratios": {f"mixed_over_{b}{suffix}": f(b) for b in ("single", "switching") for suffix, f in (
            ("", lambda b: rows["mixed"]["tokens_per_s"] / rows[b]["tokens_per_s"]),
            ("_median_of_rounds", lambda b: statistics.median(
                m / o for m, o in zip(res["mixed"]["rounds"], res[b]["rounds"]))),
            ("_per_server_cpu_s", lambda b: rows["mixed"]["tokens_per_server_cpu_s"]
             / rows[b]["tokens_per_server_cpu_s"]))},
        "targets": {"mixed_over_single": ">= 0.8", "mixed_over_switching": ">= 3"},
        "adapter_memory": {"file_bytes": file_bytes, "param_bytes": param_bytes,
                           "rss_growth_per_adapter": per_adapter_rss, "rss_over_file": per_adapter_rss / file_bytes,
                           "batch_stacks_bytes": stacks, "batch_stacks_adapters": len(server.store.resident),
                           "held_bytes_per_adapter": held / len(server.store.resident),
                           "held_over_file": held / len(server.store.resident) / file_bytes},
        "soak": {"requests": done, "seconds": soak_s, "loads": loads, "evictions": evictions,
                 "rss_samples": samples, "rss_max_over_first_quarter_max": max(v for _, v in samples) / first_q},
    }
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / f"serve-{args.device}-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("modes", "ratios", "adapter_memory")}, indent=1))
    print(f"soak: {done} requests in {soak_s:.0f} s, {loads} loads, {evictions} evictions, RSS max / first-quarter "
          f"max {result['soak']['rss_max_over_first_quarter_max']:.3f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
