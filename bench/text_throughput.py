"""Text throughput and quality, side by side, on this machine (a script, not a test).

    .venv/bin/python bench/text_throughput.py            # full run (several minutes)
    .venv/bin/python bench/text_throughput.py --quick    # fewer tokens, for a smoke check

Sections, each in its own process so peak RSS is its own:
  quality   every CPU quantization mode against fp32: next-token agreement on held-out
            text (teacher-forced), held-out perplexity, and batched generation speed.
  naive     the baseline: a transformers `pipeline`, fp32, one request after another
            (up to 8 users: sequential, more users only take longer at the same rate).
  queue     the bot: GenerationQueue + TextGenerator (quantization policy + continuous
            batching), all users submitting at once; event-loop lag measured meanwhile.
  vllm      a vLLM CPU server (the tests' .venv-vllm, started here) on the same weights:
            called directly (the openai client, all users at once), and through the bot's
            queue with the OpenAI-compatible backend; the bot's overhead is the difference.
Same model (the packaged SmolLM2-135M-Instruct), same messages, greedy decoding, and exactly
--tokens new tokens per request in every row (end of text ignored), so rows compare equal work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402  (after the path is set)

SYSTEM = "You are a friendly, concise assistant in a Discord server."  # the bot's default
NAIVE_MAX_USERS = 8  # one request after another: more users only take longer, at the same rate
PROMPTS = [
    "Write a haiku about rain.",
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Explain gravity to a ten-year-old.",
    "Name three primary colors and one fact about each.",
    "Write a short welcome message for a new Discord member.",
    "Describe a cat in two sentences.",
    "What is a good name for a pet goldfish?",
]

# Public-domain prose (Austen, Dickens, Melville, Doyle) held out from any training here.
HELD_OUT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune, must be \
in want of a wife. However little known the feelings or views of such a man may be on his first \
entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that \
he is considered the rightful property of some one or other of their daughters.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of \
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, \
it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had \
everything before us, we had nothing before us, we were all going direct to Heaven, we were all \
going direct the other way.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my \
purse, and nothing particular to interest me on shore, I thought I would sail about a little and see \
the watery part of the world. It is a way I have of driving off the spleen, and regulating the \
circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly \
November in my soul; then, I account it high time to get to sea as soon as I can.
To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other \
name. In his eyes she eclipses and predominates the whole of her sex. It was not that he felt any \
emotion akin to love for Irene Adler. All emotions, and that one particularly, were abhorrent to his \
cold, precise but admirably balanced mind. He was, I take it, the most perfect reasoning and \
observing machine that the world has seen.
"""


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def keep_best(results: dict[str, dict[str, Any]], key: str, outcomes: list[tuple[float, int]], elapsed: float,
              **extra: float) -> None:
    """Record a run of (latency, tokens) outcomes under ``key`` unless an earlier run of it was
    faster: the best of --repeat runs, since a shared host's neighbours only ever slow a run."""
    latencies = [o[0] for o in outcomes]
    tokens = sum(o[1] for o in outcomes)
    run = {"tok_s": tokens / elapsed, "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
           "tokens": tokens, **extra}
    if key not in results or run["tok_s"] > results[key]["tok_s"]:
        results[key] = run


async def start_queue(generator: Any) -> Any:
    """The bot's queue (SQLite in a temporary folder) serving ``generator`` as its text model."""
    import tempfile

    from generators.queue import GenerationQueue, QueueConfig
    from generators.registry import ModelRegistry
    from storage.database import open_database
    from storage.jobs import SqlJobStore

    tmp = Path(tempfile.mkdtemp())
    registry = ModelRegistry({"text": lambda _n: generator}, {"text": "smollm2"}, budget_bytes=2**34)
    queue = GenerationQueue(SqlJobStore(open_database(tmp / "bench.sqlite3")), registry,
                            QueueConfig(artifacts_dir=tmp / "a", max_pending_per_user=100))
    await queue.start()
    return queue


async def through_queue(queue: Any, user: int, prompt: str, tokens: int) -> tuple[float, int]:
    """One member's greedy text job through the bot's queue: (latency s, tokens generated)."""
    from storage.jobs import NewJob

    start = time.perf_counter()
    record = await queue.submit(NewJob(kind="text", model="", prompt=prompt, requester=f"u{user}",
                                       params={"temperature": 0.0, "max_new_tokens": tokens}))
    done = await queue.wait(record.id)
    assert done.status == "succeeded", done.error
    return time.perf_counter() - start, int((done.result or {})["metadata"]["tokens"])


def load_reference() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generators.model_source import packaged_smollm2

    cache = ROOT / "data" / "models"
    from generators.text import TextGenerator

    gen = TextGenerator("smollm2", quantization_mode="none", cache_dir=cache)
    gen.load()  # converts the GGUF once into the cache
    folder = gen._cache_folder(packaged_smollm2())
    assert folder is not None
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def chat_batch(tokenizer: Any) -> Any:
    """The eight PROMPTS as one left-padded batch in the chat template."""
    tokenizer.padding_side = "left"
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in PROMPTS]
    return tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False)


def next_token_quality(model: Any, ids: Any, reference_next: Any) -> tuple[float, float]:
    """(agreement, perplexity) on held-out ``ids`` (teacher-forced): the share of positions
    where ``model``'s next token is the reference's, and exp(mean NLL) of the true next tokens."""
    import torch

    ids = ids.to(model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    agreement = (logits.argmax(-1) == reference_next.to(logits.device)).float().mean().item()
    return agreement, math.exp(nll.item())


def batch_tokens_per_s(model: Any, tokenizer: Any, batch: Any, tokens: int) -> float:
    """Greedy generation speed of one batch, exactly ``tokens`` new tokens a row, after a warm-up."""
    import torch

    batch = batch.to(model.device)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return (out.shape[1] - batch["input_ids"].shape[1]) * batch["input_ids"].shape[0] / elapsed


# --- sections (each runs in a child process) --------------------------------------------------
def section_quality(args: argparse.Namespace) -> dict[str, Any]:
    import copy

    import torch

    from generators import quantization

    reference, tokenizer = load_reference()
    reference.eval()
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids[:, :512]
    with torch.inference_mode():
        ref_logits = reference(ids).logits[0, :-1].float()
    ref_next = ref_logits.argmax(-1)
    batch = chat_batch(tokenizer)
    rows = []
    for mode in args.modes:
        try:
            if mode == "bf16":
                model = copy.deepcopy(reference).to(torch.bfloat16)
            elif mode == "none":
                model = reference
            elif mode.startswith("bnb-"):  # bitsandbytes quantizes while loading
                from transformers import AutoModelForCausalLM

                quantization.choose_mode(mode, "cpu")  # raises if bitsandbytes is missing
                model = AutoModelForCausalLM.from_pretrained(reference.name_or_path,
                                                             **quantization.load_kwargs(mode, "cpu"))
            else:
                model = quantization.apply_after_load(copy.deepcopy(reference), mode, "cpu", tokenizer)
        except Exception as exc:  # e.g. bitsandbytes missing
            rows.append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"[:80]})
            continue
        agreement, perplexity = next_token_quality(model, ids, ref_next)
        rows.append({"mode": mode, "agreement": agreement, "perplexity": perplexity,
                     "batch8_tok_s": batch_tokens_per_s(model, tokenizer, batch, args.tokens)})
    return {"rows": rows, "cpu_native_bf16": quantization.cpu_has_native_bf16(),
            "auto_mode": quantization.choose_mode("auto", "cpu")}


def section_naive(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import pipeline

    model, tokenizer = load_reference()  # fp32
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    pipe([{"role": "user", "content": "hi"}], max_new_tokens=4, do_sample=False)  # warm-up
    results = {}
    for users in [u for u in args.users if u <= NAIVE_MAX_USERS]:
        latencies, tokens = [], 0
        start = time.perf_counter()
        for prompt in (PROMPTS * 8)[:users]:  # one request after another
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
            out = pipe(messages, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                       return_tensors=True)
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
            tokens += len(out[0]["generated_token_ids"]) - len(prompt)  # the ids include the prompt's
            latencies.append(time.perf_counter() - start)
        elapsed = time.perf_counter() - start
        results[str(users)] = {"tok_s": tokens / elapsed, "p50": percentile(latencies, 0.5),
                               "p95": percentile(latencies, 0.95), "tokens": tokens}
    return {"users": results, "peak_rss_mb": peak_rss_mb()}


def section_queue(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_queue(args))


async def _queue(args: argparse.Namespace) -> dict[str, Any]:

    from generators.text import TextGenerator

    batch = {"max_batch_size": args.max_batch} if args.max_batch else {}
    generator = TextGenerator("smollm2", quantization_mode=args.queue_mode, max_new_tokens=args.tokens,
                              system_prompt=SYSTEM, cache_dir=ROOT / "data" / "models", ignore_eos=True, **batch)
    # Not loaded here: the warm-up job loads it on the lane's thread, as in the bot (torch
    # work on this main thread would keep an OpenMP team alive that slows the lane's).
    queue = await start_queue(generator)

    def one(user: int, prompt: str) -> Any:
        return through_queue(queue, user, prompt, args.tokens)

    await one(0, "hi")  # warm-up
    results = {}
    # Round after round over every user count, so each count sees the same moments of a shared
    # host: the 32-vs-8 ratio compares them, and this host's speed drifts ±20 % over minutes.
    for users in [u for _ in range(args.repeat) for u in args.users]:
        lags: list[float] = []
        stop = asyncio.Event()

        async def probe(lags: list[float] = lags, stop: asyncio.Event = stop) -> None:
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.010)
                lags.append(time.perf_counter() - before - 0.010)

        prober = asyncio.create_task(probe())
        start = time.perf_counter()
        outcomes = await asyncio.gather(*[one(u, p) for u, p in enumerate((PROMPTS * 8)[:users])])
        elapsed = time.perf_counter() - start
        stop.set()
        await prober
        keep_best(results, str(users), outcomes, elapsed, lag_p99_ms=percentile(lags, 0.99) * 1000)
    await queue.stop()
    return {"users": results, "peak_rss_mb": peak_rss_mb(), "mode": generator.mode,
            "max_batch": generator.max_batch_size}


def section_vllm(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_vllm(args))


async def _vllm(args: argparse.Namespace) -> dict[str, Any]:
    import socket
    import tempfile
    import urllib.request

    import openai

    from generators.openai_text import OpenAITextGenerator
    from generators.sampling import DEFAULTS
    from generators.text import TextGenerator

    # The packaged SmolLM2 as the bot converts it once (safetensors): vLLM loads that folder as is.
    folder = TextGenerator("smollm2", cache_dir=ROOT / "data" / "models").converted_folder()
    if folder is None:
        raise SystemExit("run the queue section (or the bot) once first: it converts the packaged model")
    python = Path(os.environ.get("AIGC_BENCH_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = Path(tempfile.mkdtemp()) / "vllm.log"
    server = subprocess.Popen(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--served-model-name",
         "smollm2", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", args.vllm_dtype],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"vLLM exited: {log.read_text()[-2000:]}") from None
                await asyncio.sleep(1)
        client = openai.AsyncOpenAI(base_url=url, api_key="none", timeout=600)

        async def direct(prompt: str) -> tuple[float, int]:
            start = time.perf_counter()
            # The same messages as the bot sends (its default system prompt), so the same tokens.
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
            stream = await client.chat.completions.create(
                model="smollm2", messages=messages, max_tokens=args.tokens,  # type: ignore[arg-type]
                temperature=0.0, top_p=DEFAULTS["top_p"], stream=True, stream_options={"include_usage": True},
                extra_body={"top_k": DEFAULTS["top_k"], "repetition_penalty": DEFAULTS["repetition_penalty"],
                            "ignore_eos": True})
            tokens = 0
            async for chunk in stream:
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return time.perf_counter() - start, tokens

        generator = OpenAITextGenerator(url, None, "smollm2", max_new_tokens=args.tokens, concurrency=64,
                                        system_prompt=SYSTEM, extra_body={"ignore_eos": True})
        queue = await start_queue(generator)

        def through_bot(user: int, prompt: str) -> Any:
            return through_queue(queue, user, prompt, args.tokens)

        await direct("hi")
        await through_bot(0, "hi")  # warm-up
        results: dict[str, dict[str, Any]] = {"direct": {}, "bot": {}}
        for users in args.users:
            prompts = (PROMPTS * 8)[:users]
            for _ in range(args.repeat):  # alternated, so both see the same moments of a shared host
                for name, call in (("direct", lambda u, p: direct(p)), ("bot", through_bot)):
                    start = time.perf_counter()
                    outcomes = await asyncio.gather(*[call(u, p) for u, p in enumerate(prompts)])
                    keep_best(results[name], str(users), outcomes, time.perf_counter() - start)
        await queue.stop()
        await client.close()
        return results
    finally:
        server.terminate()
        server.wait(30)


SECTIONS = {"quality": section_quality, "naive": section_naive, "queue": section_queue, "vllm": section_vllm}


def run_child(section: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--section", section, "--tokens", str(args.tokens),
           "--users", *map(str, args.users), "--modes", *args.modes, "--queue-mode", args.queue_mode,
           "--vllm-dtype", args.vllm_dtype, "--max-batch", str(args.max_batch), "--repeat", str(args.repeat)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"section {section} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=list(SECTIONS))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--modes", nargs="+",
                        default=["none", "bf16", "fp16-weights", "int8-smooth", "int8-dynamic", "bnb-8bit", "bnb-4bit"])
    parser.add_argument("--queue-mode", default="auto", help="quantization mode of the queue run")
    parser.add_argument("--quick", action="store_true",
                        help="16 tokens; modes none, bf16, fp16-weights, int8-smooth")
    parser.add_argument("--vllm-dtype", default="bfloat16", help="the vLLM server's --dtype")
    parser.add_argument("--max-batch", type=int, default=0,
                        help="the queue's text batch size (AIGC_TEXT_MAX_BATCH); 0: the bot's default")
    parser.add_argument("--no-vllm", action="store_true", help="leave out the vLLM rows")
    # 5, not 3: this host's neighbours slow it for minutes at a time (25 % and more), long enough
    # for three rounds of one row to all land in a slow spell while another row's did not.
    parser.add_argument("--repeat", type=int, default=5, help="runs of each queue and vLLM row; the best is kept")
    args = parser.parse_args()
    if args.section:
        print(json.dumps(SECTIONS[args.section](args)))
        return
    if args.quick:
        args.tokens, args.modes = 16, ["none", "bf16", "fp16-weights", "int8-smooth"]
    print(f"{cpu_name()}, {os.cpu_count()} CPU threads. SmolLM2-135M-Instruct, {len(PROMPTS)} prompts cycled, "
          f"exactly {args.tokens} new tokens per request (end of text ignored), greedy, repetition penalty "
          f"1.1, every user submitting at once; queue and vLLM rows: best of {args.repeat} runs\n")
    quality = run_child("quality", args)
    print(f"CPU native bf16: {quality['cpu_native_bf16']}; policy picks '{quality['auto_mode']}' on this CPU\n")
    print("| mode | next-token agreement with fp32 | held-out perplexity | batch-8 tokens/s (generate) |")
    print("|---|---|---|---|")
    for row in quality["rows"]:
        if "error" in row:
            print(f"| {row['mode']} | n/a ({row['error']}) | | |")
        else:
            print(f"| {row['mode']} | {row['agreement']:.1%} | {row['perplexity']:.2f} | {row['batch8_tok_s']:.1f} |")
    naive = run_child("naive", args)
    queue = run_child("queue", args)
    vllm = {} if args.no_vllm else run_child("vllm", args)
    rows: list[tuple[str, dict[str, Any] | None]] = []
    print("\n| setup | users | tokens | tokens/s | p50 latency s | p95 latency s |")
    print("|---|---|---|---|---|---|")
    for users in map(str, args.users):
        rows = [("naive pipeline, fp32, one request after another", naive["users"].get(users)),
                (f"aigc-bot queue, embedded engine ({queue['mode']}, up to {queue['max_batch']} rows)",
                 queue["users"][users])]
        if vllm:
            rows += [(f"vLLM CPU ({args.vllm_dtype}) called directly", vllm["direct"][users]),
                     ("aigc-bot queue → vLLM (openai backend)", vllm["bot"][users])]
        for name, r in rows:
            if r is None:
                print(f"| {name} | {users} | – | – | – | – |")
            else:
                print(f"| {name} | {users} | {r['tokens']} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} |")
    print(f"\npeak RSS: naive {naive['peak_rss_mb']:.0f} MB, queue {queue['peak_rss_mb']:.0f} MB; "
          f"event-loop lag p99 while the queue generates: "
          + ", ".join(f"{u} users {q['lag_p99_ms']:.1f} ms" for u, q in queue["users"].items()))
    verdicts = []
    q = {int(u): r["tok_s"] for u, r in queue["users"].items()}
    if 8 in q and 32 in q:
        verdicts.append(f"embedded queue, 32 vs 8 users: {q[32] / q[8]:.2f}× (goal ≥ 2×)")
    mode = next((r for r in quality["rows"] if r["mode"] == queue["mode"] and "error" not in r), None)
    fp32 = next((r for r in quality["rows"] if r["mode"] == "none" and "error" not in r), None)
    if mode and fp32:
        verdicts.append(f"embedded queue's mode {queue['mode']}: next-token agreement {mode['agreement']:.1%} "
                        f"(goal ≥ 90 %), perplexity {mode['perplexity'] / fp32['perplexity'] - 1:+.1%} vs fp32 "
                        f"(goal within 5 %)")
    if vllm:
        d = {int(u): r["tok_s"] for u, r in vllm["direct"].items()}
        b = {int(u): r["tok_s"] for u, r in vllm["bot"].items()}
        if 8 in q:
            verdicts.append(f"embedded queue vs vLLM at 8 users: {q[8]:.1f} vs {d[8]:.1f} tokens/s "
                            f"({q[8] / d[8]:.2f}×, goal ≥ 1×)")
        verdicts.append("bot's overhead over vLLM called directly: "
                        + ", ".join(f"{u} users {1 - b[u] / d[u]:.1%}" for u in sorted(d)) + " (goal ≤ 10 %)")
    print("\n" + "\n".join(f"- {v}" for v in verdicts))


if __name__ == "__main__":
    main()
