"""Text to audio with Hugging Face ``transformers`` models: speech (MMS-TTS/VITS, SpeechT5,
Bark) and music (MusicGen).

``TextToAudioGenerator`` takes any model id or local path; the model family is read from its
``config.json`` (cheap, so ``check`` can validate the task before the weights load) and picks
the loading and generation code. Other text-to-audio models fall back to the transformers
``text-to-audio`` pipeline, without progress or mid-generation cancel.

Progress and cancellation: speech models synthesize sentence pieces one by one and check the
cancel flag between them; MusicGen checks it on every decoding step through a
``StoppingCriteria`` that also reports progress. Generation is serialised per generator: one
model instance computes one request at a time (torch already uses every core for one call), and
the seed is set on torch's global generator, which concurrent calls would race on.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from generators import audio_post
from generators.base import Cancelled, Generator, GeneratorError, Output, Request, Result
from generators.speech import parse_seed

TASKS = ("speech", "music")
QUANTIZE = (None, "8bit", "4bit")
PARAMS = ("task", "seconds", "format", "guidance_scale", "seed")

#: config.model_type -> the tasks the family can do. Bark sings when lyrics are wrapped in ♪.
FAMILY_TASKS: dict[str, tuple[str, ...]] = {
    "vits": ("speech",),
    "speecht5": ("speech",),
    "bark": ("speech", "music"),
    "musicgen": ("music",),
    "musicgen_melody": ("music",),
}
DEFAULT_VOCODER = "microsoft/speecht5_hifigan"
SPEECHT5_EMBEDDING_DIM = 512
MAX_PIECE_CHARS = 200  # VITS/Bark quality drops on long inputs; Bark truncates at 256 tokens

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")
_WORDS = re.compile(r"\S+")


def split_sentences(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """Sentences (at . ! ? and line breaks), packed up to ``max_chars``; longer ones cut at words."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        sentence = sentence.strip()
        if not sentence:
            continue
        words = _WORDS.findall(sentence) if len(sentence) > max_chars else [sentence]
        for word in words:
            # Pack short sentences together: fewer model calls, and natural prosody across them.
            if pieces and len(pieces[-1]) + 1 + len(word) <= max_chars:
                pieces[-1] = f"{pieces[-1]} {word}"
            else:
                pieces.append(word)
    return pieces


class _StepMonitor:
    """A transformers ``StoppingCriteria``: reports progress per step and raises on cancel.

    Raising ``Cancelled`` from inside ``generate`` stops decoding at once; transformers does not
    catch exceptions from stopping criteria.
    """

    def __init__(self, request: Request, total_steps: int, note: str) -> None:
        self.request = request
        self.total = max(1, total_steps)
        self.note = note
        self.steps = 0
        self._reported = -1.0

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        self.steps += 1
        if self.request.cancelled():
            raise Cancelled(f"cancelled at step {self.steps} of {self.total}")
        fraction = min(1.0, self.steps / self.total)
        # Every step would flood the event loop (MusicGen makes 50 steps a second of audio).
        if fraction - self._reported >= 0.02 or self.steps == self.total:
            self._reported = fraction
            self.request.on_progress(fraction, f"{self.note} step {self.steps}/{self.total}")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class TextToAudioGenerator(Generator):
    """Speech or music from a transformers text-to-audio model, loaded lazily in ``load``."""

    kind = "audio"
    max_batch_size = 1

    def __init__(
        self,
        model_id_or_path: str | Path,
        device: str = "cpu",
        quantize: str | None = None,
        *,
        vocoder: str | Path = DEFAULT_VOCODER,
        speaker_embedding: str | Path | np.ndarray | None = None,
        max_chars: int = 600,
        max_seconds: float = 30.0,
        default_seconds: float = 10.0,
        target_lufs: float = -16.0,
        local_files_only: bool = False,
        dtype: str | None = None,
    ) -> None:
        if quantize in ("", "none"):
            quantize = None
        if quantize not in QUANTIZE:
            raise GeneratorError(f"Unknown quantization {quantize!r}; use 8bit, 4bit or none.")
        self.model_id = str(model_id_or_path)
        self.device = device
        self.quantize = quantize
        self.vocoder_id = str(vocoder)
        self.speaker_embedding = speaker_embedding
        self.max_chars = max_chars
        self.max_seconds = max_seconds
        self.default_seconds = min(default_seconds, max_seconds)
        self.target_lufs = target_lufs
        self.local_files_only = local_files_only
        self.dtype = dtype
        self._model_type: str | None = None
        self._model: Any = None
        self._tokenizer: Any = None  # tokenizer or processor, per family
        self._vocoder: Any = None
        self._speaker: Any = None
        self._pipeline: Any = None
        self._lock = threading.Lock()

    # -- model family --------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        """``config.model_type`` of the model (reads config.json only, not the weights)."""
        if self._model_type is None:
            try:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(self.model_id, local_files_only=self.local_files_only)
            except Exception as exc:  # OSError, ValueError, hub errors: all mean "can't read it"
                raise GeneratorError(
                    f"Cannot read the model config of {self.model_id!r}: {_first_line(exc)}"
                ) from exc
            self._model_type = str(config.model_type)
        return self._model_type

    def tasks(self) -> tuple[str, ...]:
        """The tasks this model can do; unknown families are assumed to speak."""
        return FAMILY_TASKS.get(self.model_type, ("speech",))

    # -- lifecycle -----------------------------------------------------------------------------

    def _load_kwargs(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments for device, dtype and quantization."""
        import torch

        kwargs: dict[str, Any] = {"local_files_only": self.local_files_only}
        if self.dtype is not None:
            kwargs["dtype"] = getattr(torch, self.dtype)
        if self.quantize is None:
            return kwargs
        if not self.device.startswith("cuda"):
            raise GeneratorError(
                f"{self.quantize} quantization needs a CUDA device (bitsandbytes); "
                f"this model is set to run on {self.device!r}."
            )
        try:
            import bitsandbytes  # noqa: F401  (only to fail early with a clear message)
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise GeneratorError(
                f"{self.quantize} quantization needs bitsandbytes: pip install 'aigc-bot[cuda]'."
            ) from exc
        if self.quantize == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_compute_dtype=torch.float16,
                bnb_4bit_quant_type="nf4",
            )
        kwargs["device_map"] = {"": self.device}
        return kwargs

    def _check_device(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GeneratorError(f"Device {self.device!r} was asked for but CUDA is not available.")

    def load(self) -> None:
        """Load the weights (and tokenizer, vocoder) for the model's family."""
        with self._lock:
            if self._model is not None or self._pipeline is not None:
                return
            self._check_device()
            family = self.model_type
            kwargs = self._load_kwargs()
            try:
                self._load_family(family, kwargs)
            except GeneratorError:
                self._release()
                raise
            except Exception as exc:
                self._release()
                raise GeneratorError(
                    f"Could not load {self.model_id!r} ({family}): {_first_line(exc)}"
                ) from exc

    def _load_family(self, family: str, kwargs: dict[str, Any]) -> None:
        import transformers as tf

        if family not in FAMILY_TASKS:
            if self.quantize is not None:
                raise GeneratorError(f"Quantized loading is not supported for {family!r} models here.")
            self._pipeline = tf.pipeline(
                "text-to-audio",
                model=self.model_id,
                device=self.device,
                model_kwargs={"local_files_only": self.local_files_only},
            )
            return
        classes = {
            "vits": tf.VitsModel,
            "speecht5": tf.SpeechT5ForTextToSpeech,
            "bark": tf.BarkModel,
            "musicgen": tf.MusicgenForConditionalGeneration,
            "musicgen_melody": tf.MusicgenMelodyForConditionalGeneration,
        }
        model = classes[family].from_pretrained(self.model_id, **kwargs)
        if "device_map" not in kwargs:  # bitsandbytes places the weights itself
            model = model.to(self.device)
        model.eval()
        if family in ("vits", "musicgen"):
            # Text-only conditioning needs just the tokenizer, which avoids loading
            # feature extractors (and their extra dependencies) for nothing.
            self._tokenizer = tf.AutoTokenizer.from_pretrained(
                self.model_id, local_files_only=self.local_files_only
            )
        else:
            self._tokenizer = tf.AutoProcessor.from_pretrained(
                self.model_id, local_files_only=self.local_files_only
            )
        if family == "speecht5":
            self._vocoder = (
                tf.SpeechT5HifiGan.from_pretrained(self.vocoder_id, local_files_only=self.local_files_only)
                .to(self.device)
                .eval()
            )
            self._speaker = self._speaker_tensor()
        self._model = model

    def _speaker_tensor(self) -> Any:
        """SpeechT5's speaker x-vector: the one given (array or .npy path) or a neutral zero one."""
        import torch

        source = self.speaker_embedding
        if source is None:
            # The usual x-vectors come from a dataset download; zeros give a generic voice.
            vector = np.zeros(SPEECHT5_EMBEDDING_DIM, np.float32)
        elif isinstance(source, np.ndarray):
            vector = source.astype(np.float32).reshape(-1)
        else:
            vector = np.load(Path(source)).astype(np.float32).reshape(-1)
        if vector.shape[0] != SPEECHT5_EMBEDDING_DIM:
            raise GeneratorError(
                f"The SpeechT5 speaker embedding must have {SPEECHT5_EMBEDDING_DIM} values, "
                f"not {vector.shape[0]}."
            )
        return torch.from_numpy(vector)[None].to(self.device)

    def unload(self) -> None:
        with self._lock:
            self._release()

    def _release(self) -> None:
        """Drop every reference (the caller holds the lock) and return cached CUDA memory."""
        self._model = self._tokenizer = self._vocoder = self._speaker = self._pipeline = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def memory_bytes(self) -> int:
        total = 0
        for module in (self._model, self._vocoder, getattr(self._pipeline, "model", None)):
            if module is not None:
                total += int(module.get_memory_footprint())
        return total

    # -- requests ------------------------------------------------------------------------------

    def check(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        """Validate text, task, seconds and format; reads the model config, not the weights."""
        text = prompt.strip()
        if not text:
            raise GeneratorError("The text is empty.")
        if len(text) > self.max_chars:
            raise GeneratorError(
                f"The text is {len(text):,} characters long; the limit is {self.max_chars:,}."
            )
        if not any(ch.isalnum() for ch in text):
            raise GeneratorError("The text has no letters or digits.")
        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise GeneratorError(
                f"Unknown option(s) {', '.join(unknown)}; this model takes: {', '.join(PARAMS)}."
            )
        tasks = self.tasks()
        task = str(params.get("task") or tasks[0]).strip().lower()
        if task not in TASKS:
            raise GeneratorError(f"Unknown task {task!r}; use one of: {', '.join(TASKS)}.")
        if task not in tasks:
            raise GeneratorError(
                f"{self.model_id} ({self.model_type}) cannot do {task}; it does: {', '.join(tasks)}."
            )
        out: dict[str, Any] = {"task": task}
        if task == "music":
            raw = params.get("seconds", self.default_seconds)
            try:
                seconds = float(raw)
            except (TypeError, ValueError):
                raise GeneratorError(f"Seconds must be a number, not {raw!r}.") from None
            if not 0 < seconds <= self.max_seconds:  # also rejects NaN
                raise GeneratorError(f"Seconds must be above 0 and at most {self.max_seconds:g}.")
            out["seconds"] = seconds
        elif "seconds" in params:
            raise GeneratorError("Seconds applies to music only; speech is as long as the text.")
        if "guidance_scale" in params:
            try:
                guidance = float(params["guidance_scale"])
            except (TypeError, ValueError):
                raise GeneratorError("guidance_scale must be a number.") from None
            if not 1.0 <= guidance <= 15.0:
                raise GeneratorError("guidance_scale must be between 1 and 15.")
            out["guidance_scale"] = guidance
        fmt = str(params.get("format") or "ogg").strip().lower()
        if fmt not in audio_post.FORMATS:
            raise GeneratorError(f"Unknown format {fmt!r}; use one of: {', '.join(audio_post.FORMATS)}.")
        out["format"] = fmt
        if params.get("seed") is not None:
            out["seed"] = parse_seed(params["seed"])
        return out

    def generate(self, requests: list[Request]) -> list[Result]:
        """One result per request; raises ``Cancelled`` when a cancel flag is seen."""
        if self._model is None and self._pipeline is None:
            self.load()
        return [self._one(request) for request in requests]

    def synthesize(
        self,
        text: str,
        task: str = "speech",
        seconds: float | None = None,
        seed: int | None = None,
        request: Request | None = None,
        guidance_scale: float | None = None,
    ) -> tuple[np.ndarray, int]:
        """Raw mono float32 audio and its sample rate, before post-processing."""
        import torch

        request = request or Request(job_id=0, prompt=text)
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            family = self.model_type
            if self._pipeline is not None:
                return self._run_pipeline(text, request)
            if family in ("musicgen", "musicgen_melody"):
                return self._run_musicgen(text, seconds or self.default_seconds, request, guidance_scale)
            if family == "bark" and task == "music":
                # Bark's convention for singing: lyrics between music notes.
                return self._run_pieces([f"♪ {text} ♪"], request, self._bark_piece)
            piece_fn = {
                "vits": self._vits_piece,
                "speecht5": self._speecht5_piece,
                "bark": self._bark_piece,
            }[family]
            return self._run_pieces(split_sentences(text), request, piece_fn)

    def _one(self, request: Request) -> Result:
        params = request.params
        task = params.get("task") or self.tasks()[0]
        fmt = params.get("format", "ogg")
        seconds = params.get("seconds") if task == "music" else None
        audio, rate = self.synthesize(
            request.prompt,
            task,
            seconds,
            request.seed if request.seed is not None else params.get("seed"),
            request,
            params.get("guidance_scale"),
        )
        audio = audio_post.trim_silence(audio, rate)
        if seconds is not None:
            audio = audio_post.limit_length(audio, rate, seconds)
        if len(audio) == 0:
            raise GeneratorError("The model produced only silence for this text.")
        audio = audio_post.normalize_loudness(audio, rate, self.target_lufs)
        data = audio_post.encode(audio, rate, fmt)
        return Result(
            outputs=[Output(data=data, mime=audio_post.MIME[fmt], filename=f"{task}.{fmt}")],
            metadata={
                "model": self.model_id,
                "family": self.model_type,
                "task": task,
                "format": fmt,
                "sample_rate": audio_post.OPUS_SAMPLE_RATE if fmt == "ogg" else rate,
                "model_sample_rate": rate,
                "duration_s": round(audio_post.duration_s(audio, rate), 3),
            },
        )

    # -- per family ----------------------------------------------------------------------------

    def _run_pieces(self, pieces: list[str], request: Request, piece_fn: Any) -> tuple[np.ndarray, int]:
        """Synthesize pieces in order with a short pause between; cancel is checked between."""
        parts: list[np.ndarray] = []
        rate = 16_000
        for index, piece in enumerate(pieces):
            if request.cancelled():
                raise Cancelled(f"cancelled after {index} of {len(pieces)} pieces")
            audio, rate = piece_fn(piece)
            if len(audio):
                if parts:
                    parts.append(audio_post.silence(0.2, rate))
                parts.append(audio)
            request.on_progress((index + 1) / len(pieces), f"piece {index + 1}/{len(pieces)}")
        if not parts:
            raise GeneratorError(
                "The model could not read this text (its tokenizer knows none of the characters)."
            )
        return np.concatenate(parts), rate

    def _vits_piece(self, text: str) -> tuple[np.ndarray, int]:
        inputs = self._tokenizer(text, return_tensors="pt").to(self.device)
        # MMS tokenizers drop characters outside their alphabet; the blanks they interleave
        # mean an input of only padding has at most one id.
        if inputs["input_ids"].shape[-1] < 2:
            return np.zeros(0, np.float32), int(self._model.config.sampling_rate)
        waveform = self._model(**inputs).waveform[0]
        return _to_numpy(waveform), int(self._model.config.sampling_rate)

    def _speecht5_piece(self, text: str) -> tuple[np.ndarray, int]:
        inputs = self._tokenizer(text=text, return_tensors="pt")
        ids = inputs["input_ids"].to(self.device)
        speech = self._model.generate_speech(ids, self._speaker, vocoder=self._vocoder)
        return _to_numpy(speech), int(self._vocoder.config.sampling_rate)

    def _bark_piece(self, text: str) -> tuple[np.ndarray, int]:
        inputs = self._tokenizer(text, return_tensors="pt").to(self.device)
        audio = self._model.generate(**inputs)
        return _to_numpy(audio[0]), int(self._model.generation_config.sample_rate)

    def _run_musicgen(
        self, text: str, seconds: float, request: Request, guidance_scale: float | None
    ) -> tuple[np.ndarray, int]:
        from transformers import StoppingCriteriaList

        audio_config = self._model.config.audio_encoder
        rate = int(audio_config.sampling_rate)
        frame_rate = float(getattr(audio_config, "frame_rate", 0) or 50)
        # The delay pattern costs one step per extra codebook before audio comes out.
        codebooks = int(getattr(self._model.config.decoder, "num_codebooks", 1))
        steps = math.ceil(seconds * frame_rate) + codebooks - 1
        inputs = self._tokenizer([text], padding=True, return_tensors="pt").to(self.device)
        monitor = _StepMonitor(request, steps, "music")
        extra: dict[str, Any] = {}
        if guidance_scale is not None:
            extra["guidance_scale"] = guidance_scale
        out = self._model.generate(
            **inputs,
            max_new_tokens=steps,
            stopping_criteria=StoppingCriteriaList([monitor]),
            **extra,
        )
        audio = out[0]  # (channels, samples); stereo checkpoints get averaged to mono
        return audio_post.as_mono(_to_numpy(audio).T), rate

    def _run_pipeline(self, text: str, request: Request) -> tuple[np.ndarray, int]:
        if request.cancelled():
            raise Cancelled("cancelled before start")
        out = self._pipeline(text)
        request.on_progress(1.0, "done")
        audio = np.asarray(out["audio"], dtype=np.float32)
        return audio_post.as_mono(audio.T if audio.ndim == 2 else audio), int(out["sampling_rate"])


def _to_numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy().astype(np.float32)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
