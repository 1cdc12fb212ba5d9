"""A tiny chat model built from a config, saved as a normal local model folder.

Character-level tokenizer with a ChatML template and a 2-layer Llama, so the real loading
path (`from_pretrained` on a folder) and the real generation code run in milliseconds.
The weights are initialised with a large scale so that greedy decoding is decisive
(not a coin flip between near-equal logits), which keeps batch-versus-solo checks exact.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_chat_model(folder: Path, *, seed: int = 0, max_positions: int = 8192, hidden_size: int = 64,
                          heads: int = 4, kv_heads: int = 2) -> Path:
    """Write a tiny model + tokenizer to ``folder`` and return it. (vLLM's CPU attention needs a
    head size of at least 64: ``hidden_size=128, heads=2`` for the vLLM tests.)"""
    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {token: i for i, token in enumerate(SPECIALS + chars + ["<unk>"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        initializer_range=0.5, pad_token_id=vocab["<|pad|>"], eos_token_id=vocab["<|im_end|>"],
        bos_token_id=vocab["<|im_start|>"], tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Never end on its own: tests control length through max_new_tokens.
    with torch.no_grad():
        model.lm_head.weight[vocab["<|im_end|>"]] = 0.0
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_lora_adapter(model_dir: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter (q/v, r 4) for the tiny model, strong enough to change greedy output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0)
    peft_model.save_pretrained(str(folder))
    return folder
