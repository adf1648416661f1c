"""Is this GPU ready for the GPU pool? One script, a few minutes on one GPU, a report, and an exit status.

    python -m bench.gpu_check [--cpu] [--skip STEP ...] [--tokens 64] [--batches 1 8 32] [--write]

Steps (`--skip` takes their names): `environment` (versions, compute capability, bf16), `sdpa` (which attention
kernels take the decoder's real masks and cache shapes, and which one torch picks), `sampling` (on the device,
one host transfer), `precision` (bf16, or fp16 where bf16 is not native, against fp32 on a tiny random model and
on MODEL_DIR's), `memory` (the KV cache MAX_TOKENS_IN_FLIGHT sizes, memory after loading), `throughput` (decode
tokens/s at each batch beside transformers' generate() with a static cache), `features` (one beam search, one
scoring) and `worker` (`rq worker gpu` on a redis-server of its own answers a generation and a beam job).
Exits 1 if any step fails.

Without CUDA it says so and exits 0; `--cpu` runs the same steps on the CPU (bf16 there) as a dry run, which
is how the tests run the script itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import redis
import torch

from bench.gpu_steps import (
    CheckFailed,
    Target,
    device_sampling,
    environment,
    memory,
    precision,
    sdpa_probe,
    throughput,
)
from shared.protocol import JobKind
from shared.sampling import SamplingParams
from shared.settings import Settings
from workers.gpu.device import native_bf16


def features(target: Target) -> list[str]:
    """One beam search and one scoring of candidates on the loaded decoder."""
    from shared.tokenizer import TextTokenizer
    from tests.engine_helpers import (  # as rows of an engine's batch, as a worker runs them
        beam_search,
        score_candidates,
    )

    label, folder = target.main_model
    decoder, tokenizer = target.loaded[label], TextTokenizer(folder)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    beams = beam_search(decoder, tokenizer, prompt, 4, 16, eos_token_ids=tokenizer.eos_token_ids)
    texts = ["Paris.", "The capital of France is Paris.", "Blue."]
    scores = score_candidates(decoder, tokenizer, prompt, [tokenizer.encode_rendered(t) for t in texts])
    if not beams or not all(map(torch.isfinite, torch.tensor([b.score for b in beams] + scores))):
        raise CheckFailed(f"beam search or scoring gave no candidate or a non-finite score: {beams}, {scores}")
    return [f"beam search (width 4): best {tokenizer.decode(beams[0].token_ids)!r} ({beams[0].score:.3f})",
            "scores: " + ", ".join(f"{t!r} {s:.3f}" for t, s in zip(texts, scores))]


def worker(target: Target) -> list[str]:
    """`rq worker gpu` (the Procfile's line) on a redis-server of its own answers a generation and a beam job."""
    from bench.service import ProcessGroup, procfile_commands
    from shared.tokenizer import TextTokenizer
    from tests.service_fixtures import RedisServer

    if shutil.which("redis-server") is None:
        raise CheckFailed("redis-server is not installed (bin/ensure-redis installs it)")
    label, folder = target.main_model
    server, group = RedisServer(), ProcessGroup("gpu-check")
    server.start()
    connection = redis.Redis.from_url(server.url)
    try:
        env = {**os.environ, "REDIS_URL": server.url, "MODEL_DIR": str(folder), "WORKER_DEVICE": str(target.device),
               "WORKER_DTYPE": str(target.half).removeprefix("torch."), "MAX_BATCH_SIZE": "8", "MAX_SEQ_LEN": "512",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
        group.start("gpu", ["bash", "-c", procfile_commands()["gpu"]], env)
        prompt = TextTokenizer(folder).encode("The capital of France is")
        started = time.monotonic()
        answers = {kind: answer(connection, group, prompt, kind) for kind in (JobKind.GENERATE, JobKind.BEAM)}
        return [f"{label}: {kind.value} job answered {text!r}" for kind, text in answers.items()] + [
            f"both within {time.monotonic() - started:.1f} s of enqueueing, the worker's start included (its log: "
            f"{group.log_dir})"]
    finally:
        group.stop()
        server.stop()


def answer(connection, group, prompt: list[int], kind: JobKind) -> str:
    """Enqueue one job of `kind` on the `gpu` queue and wait for its `done` event; its text."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from shared.events import read_backlog
    from shared.protocol import JOB_FUNCTION, BeamOptions, GenerationJob

    job_id = uuid.uuid4().hex
    beam = BeamOptions(beam_width=2, use_rerank=False) if kind is JobKind.BEAM else None
    job = GenerationJob(job_id=job_id, prompt_ids=prompt, kind=kind, beam=beam,
                        sampling=SamplingParams(max_tokens=8, temperature=0))
    Queue("gpu", connection=connection, serializer=JSONSerializer).enqueue(
        JOB_FUNCTION, kwargs={"payload": job.model_dump(mode="json")}, job_id=job_id)
    group.wait_until(lambda: any(e.type in ("done", "error") for e in read_backlog(connection, job_id)),
                     f"the GPU worker's answer to a {kind.value} job")
    last = read_backlog(connection, job_id)[-1]
    if last.type != "done":
        raise CheckFailed(f"the {kind.value} job ended with {last.data}")
    return last.data["output_text"]


STEPS = {"environment": environment, "sdpa": sdpa_probe, "sampling": device_sampling, "precision": precision,
         "memory": memory, "throughput": throughput, "features": features, "worker": worker}


def tiny_model() -> Path:
    """A tiny random-weight Llama, prepared as the weights command prepares any checkpoint (tests/tiny_model.py)."""
    from tests.tiny_model import make_tiny_checkpoint
    from workers.preparation.command import prepare

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-tiny-"))
    prepare(make_tiny_checkpoint(folder / "checkpoint"), folder / "weights")
    return folder / "weights"


def run(target: Target, skip: set[str]) -> list[str]:
    """Run every step not skipped, printing each one's lines as it ends; the report's lines (the last: the tally)."""
    report, failed = [], []

    def say(line: str) -> None:
        print(line, flush=True)
        report.append(line)

    for name, step in STEPS.items():
        if name in skip:
            say(f"[skip] {name}")
            continue
        started = time.monotonic()
        try:
            lines, status = step(target), "ok"
        except Exception as exc:  # noqa: BLE001 (every failure is reported, and the other steps still run)
            lines, status = [f"{type(exc).__name__}: {exc}", *traceback.format_exc().splitlines()[-6:]], "FAIL"
            failed.append(name)
        say(f"[{status}] {name} ({time.monotonic() - started:.1f} s)")
        for line in lines:
            say(f"       {line}")
    say(f"gpu_check: {len(STEPS) - len(skip) - len(failed)} ok, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else ""))
    return report


def write_report(target: Target, report: list[str]) -> None:
    """The report as BENCHMARKS.md's "GPU check" section (its figures belong there, not in the code or docs)."""
    from bench.common import write_section

    device = torch.cuda.get_device_name(target.device) if target.cuda else "CPU (dry run)"
    write_section(f"GPU check ({device})", f"One run of `python -m bench.gpu_check`, {target.tokens} new tokens per "
                  f"sequence when timing.\n\n```\n" + "\n".join(report) + "\n```")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="dry run: the same steps on the CPU (bf16)")
    parser.add_argument("--skip", nargs="*", default=[], choices=sorted(STEPS), help="steps not to run")
    parser.add_argument("--tokens", type=int, help="new tokens per sequence when timing (64; 8 with --cpu)")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes timed (1 8 32; 1 2 with --cpu)")
    parser.add_argument("--write", action="store_true", help="write the report into BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print(f"gpu_check skipped: no CUDA (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "`--cpu` runs a dry run on the CPU")
        return 0
    settings = Settings.from_env()
    device = torch.device("cpu") if args.cpu else torch.device(settings.worker_device)
    half = torch.float16 if device.type == "cuda" and not native_bf16(device) else torch.bfloat16
    models = {"tiny": tiny_model()}
    if (settings.model_path / "config.json").is_file():
        models["model"] = settings.model_path
    target = Target(device=device, half=half, models=models, batches=tuple(args.batches or ((1, 2) if args.cpu
                    else (1, 8, 32))), tokens=args.tokens or (8 if args.cpu else 64),
                    max_batch_size=max(settings.max_batch_size, *(args.batches or [1])),
                    max_seq_len=settings.max_seq_len, max_tokens_in_flight=settings.max_tokens_in_flight)
    print(f"gpu_check on {device}{' (dry run)' if args.cpu else ''}: models {', '.join(map(str, models.values()))}")
    report = run(target, set(args.skip))
    if args.write:
        write_report(target, report)
    return 0 if report[-1].endswith(" 0 failed") else 1


if __name__ == "__main__":
    sys.exit(main())
