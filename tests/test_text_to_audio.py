"""The transformers text-to-audio backend, on tiny VITS and MusicGen models built from configs.

The models have random weights and a few thousand parameters; they are saved to a temporary
folder and loaded back through the generator's own ``from_pretrained`` path, so the loading,
tokenizing, generation, progress, cancel and encoding code all run without the hub.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from generators import audio_post
from generators.base import Cancelled, GeneratorError, Request
from generators.text_to_audio import TextToAudioGenerator, split_sentences

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MMS-TTS-style VITS model: character vocab, blanks interleaved, 16 kHz."""
    from transformers import VitsConfig, VitsModel, VitsTokenizer

    folder = tmp_path_factory.mktemp("vits")
    chars = list("abcdefghijklmnopqrstuvwxyz '.,!?-")
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    vocab["<unk>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = VitsTokenizer(str(folder / "vocab.json"), add_blank=True, normalize=True, phonemize=False)
    config = VitsConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        flow_size=16,
        spectrogram_bins=17,
        upsample_initial_channel=16,
        upsample_rates=[4, 4],
        upsample_kernel_sizes=[8, 8],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1,
        posterior_encoder_num_wavenet_layers=1,
        duration_predictor_num_flows=1,
        duration_predictor_filter_channels=16,
        depth_separable_num_layers=1,
        sampling_rate=16_000,
        window_size=4,
    )
    torch.manual_seed(0)
    VitsModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_musicgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MusicGen with a 1-layer T5 text encoder, a tiny EnCodec (8 kHz, 125 frames/s), word tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenForConditionalGeneration,
        PreTrainedTokenizerFast,
        T5Config,
    )
    from transformers.models.musicgen.configuration_musicgen import MusicgenDecoderConfig

    folder = tmp_path_factory.mktemp("musicgen")
    words = ["<pad>", "</s>", "<unk>", "happy", "rock", "jazz", "piano", "calm", "a", "song"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    text = T5Config(
        vocab_size=len(words),
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    codec = EncodecConfig(
        hidden_size=8,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 8],
        codebook_size=16,
        codebook_dim=8,
        num_lstm_layers=1,
        sampling_rate=8_000,
        audio_channels=1,
        target_bandwidths=[2.5],
        compress=2,
    )
    # As in the real checkpoints, the pad/start token is one past the codebook vocabulary.
    decoder = MusicgenDecoderConfig(
        vocab_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        ffn_dim=32,
        num_codebooks=codec.num_quantizers,
        max_position_embeddings=512,
        pad_token_id=16,
        bos_token_id=16,
    )
    config = MusicgenConfig(
        text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict()
    )
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config)
    model.generation_config.pad_token_id = 16
    model.generation_config.decoder_start_token_id = 16
    model.generation_config.do_sample = True
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_request(generator: TextToAudioGenerator, text: str, **params: object) -> Request:
    return Request(job_id=1, prompt=text, params=generator.check(text, params), seed=0)


# -- VITS ------------------------------------------------------------------------------------


def test_vits_synthesizes_ogg(tiny_vits: Path) -> None:
    generator = TextToAudioGenerator(tiny_vits)
    assert generator.tasks() == ("speech",)
    assert not generator.loaded
    generator.load()
    assert generator.loaded and generator.memory_bytes() > 0
    request = make_request(generator, "Hello there. How are you?")
    assert request.params == {"task": "speech", "format": "ogg"}
    (result,) = generator.generate([request])
    (output,) = result.outputs
    assert output.mime == "audio/ogg" and output.filename == "speech.ogg"
    audio, rate = audio_post.decode(output.data)
    assert rate == 48_000 and len(audio) > 0 and np.abs(audio).max() > 0.01
    assert result.metadata["family"] == "vits" and result.metadata["model_sample_rate"] == 16_000
    generator.unload()
    assert not generator.loaded


def test_vits_wav_and_progress_per_piece(tiny_vits: Path) -> None:
    generator = TextToAudioGenerator(tiny_vits)
    events: list[float] = []
    text = "one two three. " * 16  # ~240 chars -> two pieces
    request = make_request(generator, text, format="wav")
    request.on_progress = lambda fraction, note: events.append(fraction)
    (result,) = generator.generate([request])
    audio, rate = audio_post.decode(result.outputs[0].data)
    assert rate == 16_000 and len(audio) > 0
    assert len(events) == len(split_sentences(text)) > 1 and events[-1] == 1.0


def test_vits_cancel_between_pieces(tiny_vits: Path) -> None:
    generator = TextToAudioGenerator(tiny_vits)
    cancel = threading.Event()
    text = "one two three. " * 30
    request = make_request(generator, text)
    request.cancel_event = cancel
    request.on_progress = lambda fraction, note: cancel.set()
    with pytest.raises(Cancelled, match="after 1 of"):
        generator.generate([request])


def test_vits_text_outside_the_alphabet(tiny_vits: Path) -> None:
    generator = TextToAudioGenerator(tiny_vits)
    request = make_request(generator, "日本語")
    with pytest.raises(GeneratorError, match="tokenizer knows none"):
        generator.generate([request])


# -- MusicGen --------------------------------------------------------------------------------


def test_musicgen_makes_music_of_the_asked_length(tiny_musicgen: Path) -> None:
    generator = TextToAudioGenerator(tiny_musicgen, default_seconds=1.0)
    assert generator.tasks() == ("music",)
    events: list[float] = []
    request = make_request(generator, "happy rock song", seconds=0.3)
    assert request.params == {"task": "music", "seconds": 0.3, "format": "ogg"}
    request.on_progress = lambda fraction, note: events.append(fraction)
    (result,) = generator.generate([request])
    audio, rate = audio_post.decode(result.outputs[0].data)
    assert rate == 48_000
    assert 0.1 < len(audio) / rate <= 0.35
    assert np.abs(audio).max() > 0.01
    assert events and events[-1] == 1.0 and events == sorted(events)
    assert result.outputs[0].filename == "music.ogg"


def test_musicgen_cancel_mid_generation(tiny_musicgen: Path) -> None:
    generator = TextToAudioGenerator(tiny_musicgen)
    cancel = threading.Event()
    steps: list[float] = []

    def progress(fraction: float, note: str) -> None:
        steps.append(fraction)
        cancel.set()

    # guidance_scale rides along: the first step runs with classifier-free guidance.
    request = make_request(generator, "calm piano", seconds=2.0, guidance_scale=3.0)
    request.cancel_event = cancel
    request.on_progress = progress
    with pytest.raises(Cancelled, match="cancelled at step"):
        generator.generate([request])
    assert len(steps) == 1  # stopped on the step after the flag was set


# -- checks and loading errors ---------------------------------------------------------------


def test_task_and_param_checks(tiny_vits: Path, tiny_musicgen: Path) -> None:
    vits = TextToAudioGenerator(tiny_vits)
    music = TextToAudioGenerator(tiny_musicgen, max_seconds=20)
    with pytest.raises(GeneratorError, match="cannot do music"):
        vits.check("hello", {"task": "music"})
    with pytest.raises(GeneratorError, match="cannot do speech"):
        music.check("hello", {"task": "speech"})
    with pytest.raises(GeneratorError, match="music only"):
        vits.check("hello", {"seconds": 3})
    with pytest.raises(GeneratorError, match="at most 20"):
        music.check("rock", {"seconds": 45})
    with pytest.raises(GeneratorError, match="above 0"):
        music.check("rock", {"seconds": 0})
    with pytest.raises(GeneratorError, match="Unknown task"):
        vits.check("hello", {"task": "noise"})
    with pytest.raises(GeneratorError, match="empty"):
        vits.check("  ", {})
    with pytest.raises(GeneratorError, match="limit is 600"):
        vits.check("a" * 601, {})
    with pytest.raises(GeneratorError, match="Unknown option"):
        vits.check("hello", {"voice": "x"})
    with pytest.raises(GeneratorError, match="Unknown format"):
        vits.check("hello", {"format": "flac"})
    assert vits.check("hello", {"seed": 5}) == {"task": "speech", "format": "ogg", "seed": 5}
    with pytest.raises(GeneratorError, match="Seed"):
        vits.check("hello", {"seed": -2})
    assert not vits.loaded and not music.loaded


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    generator = TextToAudioGenerator(tmp_path / "nothing-here", local_files_only=True)
    with pytest.raises(GeneratorError, match="Cannot read the model config"):
        generator.check("hello", {})
    with pytest.raises(GeneratorError, match="Cannot read the model config"):
        generator.load()


def test_quantization_needs_cuda(tiny_vits: Path) -> None:
    with pytest.raises(GeneratorError, match="Unknown quantization"):
        TextToAudioGenerator(tiny_vits, quantize="3bit")
    generator = TextToAudioGenerator(tiny_vits, device="cpu", quantize="8bit")
    with pytest.raises(GeneratorError, match="needs a CUDA device"):
        generator.load()
    assert not generator.loaded


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda(tiny_vits: Path) -> None:
    with pytest.raises(GeneratorError, match="CUDA is not available"):
        TextToAudioGenerator(tiny_vits, device="cuda").load()


def test_split_sentences_packs_and_cuts() -> None:
    assert split_sentences("Hi. There! Ok?") == ["Hi. There! Ok?"]
    pieces = split_sentences("One sentence here. " * 30, max_chars=60)
    assert all(len(p) <= 60 for p in pieces) and len(pieces) > 5
    assert split_sentences("word " * 100, max_chars=50)[0].count("word") == 10
