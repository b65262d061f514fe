"""Tiny real checkpoints built at run time, for tests on the real model classes.

Nothing comes from a hub: a byte-level BPE tokenizer is trained here with the ``tokenizers``
package on a few built-in English sentences, and the models have random weights drawn from a
seed. Each builder writes a directory that the real loaders read offline:

* :func:`build_gpt2`: a 2-layer ``GPT2LMHeadModel`` for lm-eval's ``HFLM``
  (``HFLM(pretrained=directory, device="cpu", batch_size=1)``);
* :func:`build_llava`: a ``LlavaForConditionalGeneration`` (tiny CLIP vision tower, tiny Llama
  text model) with its processor for lmms-eval's ``llava_hf``
  (``LlavaHf(pretrained=directory, device="cpu", device_map="cpu")``).

The same seed gives the same weights; another seed gives other weights. The output rows of
the special tokens are zeroed, so that greedy decoding never starts with an end-of-sequence
or a special token that decoding drops: the random models answer with non-empty text, which
the cache stores (empty text is a failure and never cached).

llava_hf under transformers 5: its ``loglikelihood`` calls the processor on the prompt alone
(``<image>`` and no image) to count the context's tokens, which transformers 5's processors
refuse (``ValueError: Found 1 <image> tokens in the text but no images were passed.``: every
``ProcessorMixin`` with an ``image_token`` checks it). So :func:`build_llava` ships, by
default, a ``CLIPProcessor`` (the CLIP image processor and the tokenizer, no ``image_token``
to check or expand) and a vision tower that sees each image as one patch, so the prompt's
single ``<image>`` token is the one image embedding the model expects; the real LlavaHf,
LlavaForConditionalGeneration and their loading code run unchanged. ``processor="llava"``
builds the ``LlavaProcessor`` layout of real checkpoints (25 image tokens per image, expanded
by the processor), with which llava_hf's ``generate_until`` runs and ``loglikelihood`` fails.

Also here: :class:`ForwardCounter` (counts the forward passes of a ``torch.nn.Module``) and
request builders for both harnesses' layouts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IMAGE_TOKEN = "<image>"
VOCAB_SIZE = 320  # 256 byte-level symbols, the special tokens and some merges
GAIN = 2.0  # the scale of the random weights (see _spread)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a red ball on green grass under a blue sky.",
    "What colour is the picture? The picture is red, green or blue.",
    "Question: what is two plus three? Answer: five.",
    "The cat sat on the mat and looked at the small bird in the tree.",
    "An image shows a house with a white door and two windows.",
    "She reads a book every evening before she goes to sleep.",
    "The weather today is sunny with a light wind from the west.",
    "Describe the image in one short sentence.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT: yes no maybe one two three four five six seven eight nine ten",
]
# Another corpus, for a second tokenizer of the same size whose merges (so token ids) differ.
OTHER_CORPUS = [
    "Numbers and letters: zero, eleven, twelve, thirteen, fourteen, fifteen, sixteen.",
    "Jumping jaguars quickly vex the wizard who boxes with five dozen liquor jugs.",
    "Mountains, rivers and valleys stretch far beyond the horizon at dawn.",
    "Programming languages include Python, Rust, Haskell and many others.",
    "Kettles whistle, clocks tick, and the old piano plays a quiet melody.",
    "Every morning the baker opens the shop and sells fresh bread and pastries.",
    "Astronomers observed a comet passing near the planet during the night.",
    "Quiz: which ocean is the largest? Pacific. Which desert is the driest? Atacama.",
]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def train_tokenizer(directory: str | os.PathLike[str], extra_special: Sequence[str] = (), *,
                    corpus: Iterable[str] = CORPUS, vocab_size: int = VOCAB_SIZE) -> Any:  # fmt: skip
    """Train a byte-level BPE tokenizer on ``corpus`` and save it into ``directory``.

    bos/eos/unk/pad are ``<s>``, ``</s>``, ``<unk>``, ``<pad>``; ``extra_special`` adds more
    special tokens (``"<image>"`` for LLaVA). Returns the ``PreTrainedTokenizerFast``;
    ``AutoTokenizer.from_pretrained(directory)`` loads it back offline.
    """
    _offline()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS, PAD, *extra_special]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=list(extra_special), model_max_length=512,
    )  # fmt: skip
    Path(directory).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return fast


def _spread(model: Any, gain: float = GAIN) -> None:
    """Draw the weights again with a scale at which every input moves the output.

    transformers' own initialisation (std 0.02) suits training, not a random model: at width
    32 the layers add almost nothing to the residual stream and the output is near uniform,
    so a LLaVA's answers do not depend on its image. Linear and convolution weights get std
    ``gain / sqrt(fan_in)``, embeddings std ``gain`` (drawn from the global generator: the
    caller seeds it).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (torch.nn.Embedding, torch.nn.Conv2d)):
                weight.normal_(0.0, gain)
            elif isinstance(module, torch.nn.Linear):
                weight.normal_(0.0, gain / weight[0].numel() ** 0.5)


def _silence_specials(weight: Any, tokenizer: Any) -> None:
    """Zero the output rows of the special tokens (see the module's docstring)."""
    import torch

    with torch.no_grad():
        for token_id in tokenizer.all_special_ids:
            weight[token_id].zero_()


def build_gpt2(directory: str | os.PathLike[str], seed: int = 0, **config_overrides: Any) -> Path:
    """A 2-layer ``GPT2LMHeadModel`` (n_embd 32, transformers' own random initialisation from
    ``seed``) and its tokenizer, saved into ``directory`` (over whatever was there).
    ``config_overrides`` go to ``GPT2Config``. Returns the directory."""
    _offline()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = Path(directory)
    tokenizer = train_tokenizer(directory)
    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2, n_inner=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    settings.update(config_overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**settings)).eval()
    _silence_specials(model.get_output_embeddings().weight, tokenizer)
    model.save_pretrained(str(directory))
    return directory


def build_llava(
    directory: str | os.PathLike[str], seed: int = 0, *, processor: str = "clip", **config_overrides: Any
) -> Path:
    """A tiny ``LlavaForConditionalGeneration`` (CLIP vision tower and Llama text model, 2
    layers of width 32 each) with random weights from ``seed`` (see :func:`_spread`) and its
    processor (a ``CLIPImageProcessor`` and the trained tokenizer with an ``<image>`` token),
    saved into ``directory`` (over whatever was there).

    ``processor="clip"`` (default): a ``CLIPProcessor``, 12x12 images in one patch, one image
    token; ``processor="llava"``: a ``LlavaProcessor``, 30x30 images in 6x6 patches, 25 image
    tokens (llava_hf's ``loglikelihood`` fails with it under transformers 5: see the module's
    docstring).

    ``config_overrides`` go to ``LlavaConfig`` (``vision_feature_layer=-1``, ...). No chat
    template is saved: llava_hf sets its Vicuna template on the tokenizer on the first call,
    as with checkpoints that have none. Returns the directory.
    """
    _offline()
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    directory = Path(directory)
    if processor not in ("clip", "llava"):
        raise ValueError(f"processor must be 'clip' or 'llava', not {processor!r}")
    tokenizer = train_tokenizer(directory, extra_special=(IMAGE_TOKEN,))
    # "llava": 30x30 images in 6x6 patches (25 image tokens, expanded by the processor);
    # "clip": one 12x12 patch (one image token, the <image> of the prompt itself).
    image_size, patch_size = (30, 6) if processor == "llava" else (12, 12)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)  # fmt: skip
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    settings: dict[str, Any] = dict(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(image_size // patch_size) ** 2, projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    settings.update(config_overrides)
    config = LlavaConfig(**settings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _spread(model)
    _silence_specials(model.get_output_embeddings().weight, tokenizer)
    model.save_pretrained(str(directory))
    images = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                                do_center_crop=True, do_resize=True)  # fmt: skip
    if processor == "llava":
        # The CLIP tower returns one embedding per patch plus a CLS one; the "default"
        # strategy drops the CLS one, hence 25 + 1 - 1 image tokens per image.
        proc: Any = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=patch_size,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   image_token=IMAGE_TOKEN, num_additional_image_tokens=1)  # fmt: skip
    else:
        proc = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    proc.save_pretrained(str(directory))
    return directory


def config_of(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The saved ``config.json`` of a checkpoint."""
    return json.loads((Path(directory) / "config.json").read_text())


# -- forward passes ------------------------------------------------------------------------------


class ForwardCounter:
    """Counts the forward passes of a ``torch.nn.Module`` (a forward hook), e.g.
    ``ForwardCounter(lm._model)``; ``.count`` so far, ``.remove()`` to unhook."""

    def __init__(self, module: Any) -> None:
        self.count = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def count_forwards(module: Any) -> ForwardCounter:
    """Start counting the forward passes of ``module``."""
    return ForwardCounter(module)


# -- lmms-eval requests (llava_hf) --------------------------------------------------------------

TASK, SPLIT = "tiny", "test"
COLOURS = [(200, 30, 30), (20, 180, 40), (30, 40, 220), (230, 200, 40)]


def picture(rgb: tuple[int, int, int], size: int = 24) -> Any:
    """A small RGB image with some texture around a base colour."""
    from PIL import Image

    img = Image.new("RGB", (size, size))
    img.putdata(
        [tuple(min(255, c + (x * 7 + y * 11) % 41) for c in rgb) for y in range(size) for x in range(size)]
    )
    return img


def lmms_task_dict(n: int = 3, task: str = TASK, split: str = SPLIT) -> dict[str, Any]:
    """``{task: {split: [docs]}}`` of ``n`` documents, each with a picture and a question, as
    lmms-eval sets ``model.task_dict``."""
    docs = [{"image": picture(COLOURS[i % len(COLOURS)]), "question": f"What colour is picture {i}?",
             "answer": ["red", "green", "blue", "yellow"][i % 4]} for i in range(n)]  # fmt: skip
    return {task: {split: docs}}


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    return [doc["image"]]


def lmms_generate(doc_id: int, context: str | None = None, max_new_tokens: int = 4,
                  task: str = TASK, split: str = SPLIT) -> Any:  # fmt: skip
    """An lmms-eval (simple layout) greedy ``generate_until`` Instance for llava_hf."""
    from lmms_eval.api.instance import Instance

    gen = {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    args = (context if context is not None else f"What colour is picture {doc_id}?", gen, doc_to_visual,
            doc_id, task, split)  # fmt: skip
    return Instance(request_type="generate_until", arguments=args, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1, "split": split})  # fmt: skip


def lmms_loglikelihood(doc_id: int, continuation: str, context: str | None = None,
                       task: str = TASK, split: str = SPLIT) -> Any:  # fmt: skip
    """An lmms-eval ``loglikelihood`` Instance for llava_hf."""
    from lmms_eval.api.instance import Instance

    args = (context if context is not None else f"What colour is picture {doc_id}?", continuation, doc_to_visual,
            doc_id, task, split)  # fmt: skip
    return Instance(request_type="loglikelihood", arguments=args, idx=0,
                    metadata={"task": task, "doc_id": doc_id, "repeats": 1, "split": split})  # fmt: skip


def lmms_requests(n: int = 3) -> tuple[list[Any], list[Any]]:
    """Fresh ``generate_until`` and ``loglikelihood`` requests over :func:`lmms_task_dict` (n)."""
    gen = [lmms_generate(i) for i in range(n)]
    ll = [lmms_loglikelihood(i, c) for i in range(n) for c in (" red", " blue")]
    return gen, ll


# -- lm-eval requests (HFLM) --------------------------------------------------------------------

LM_QUESTIONS = ["Question: what is two plus three? Answer:", "The cat sat on the", "A picture of a red",
                "Describe the image in one"]  # fmt: skip


def lm_generate(doc_id: int, context: str, max_gen_toks: int = 4) -> Any:
    """An lm-eval greedy ``generate_until`` Instance."""
    from lm_eval.api.instance import Instance

    gen = {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return Instance(request_type="generate_until", doc={"question": context}, arguments=(context, gen), idx=0,
                    metadata=("tiny", doc_id, 1))  # fmt: skip


def lm_loglikelihood(doc_id: int, context: str, continuation: str, idx: int = 0) -> Any:
    """An lm-eval ``loglikelihood`` Instance."""
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={"question": context}, arguments=(context, continuation),
                    idx=idx, metadata=("tiny", doc_id, 1))  # fmt: skip


def lm_rolling(doc_id: int, text: str) -> Any:
    """An lm-eval ``loglikelihood_rolling`` Instance."""
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood_rolling", doc={"text": text}, arguments=(text,), idx=0,
                    metadata=("tiny", doc_id, 1))  # fmt: skip


def lm_requests() -> dict[str, list[Any]]:
    """Fresh requests of the three lm-eval methods, by method."""
    return {
        "generate_until": [lm_generate(i, q) for i, q in enumerate(LM_QUESTIONS)],
        "loglikelihood": [lm_loglikelihood(i, q, c, j) for i, q in enumerate(LM_QUESTIONS)
                          for j, c in enumerate((" five", " blue"))],
        "loglikelihood_rolling": [lm_rolling(i, q) for i, q in enumerate(LM_QUESTIONS)],
    }  # fmt: skip


def run_lm(
    lm: Any, methods: Sequence[str] = ("generate_until", "loglikelihood", "loglikelihood_rolling")
) -> dict[str, list[Any]]:
    """Each method of ``lm`` on fresh :func:`lm_requests`."""
    requests = lm_requests()
    return {m: list(getattr(lm, m)(requests[m])) for m in methods}
