"""Writes the tiny Hugging Face fixtures of tests/test_hf_checkpoint.py and
tests/test_llama.py (run once).

Needs torch, transformers, tokenizers, sentencepiece and safetensors, which mtx itself
never imports (tokenizers aside):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers sentencepiece
    /tmp/ref/bin/python tools/make_hf_fixtures.py --out tests/fixtures            # T5
    /tmp/ref/bin/python tools/make_hf_fixtures.py --out tests/fixtures --family llama

writes two random ``T5ForConditionalGeneration`` directories, each with config.json,
safetensors weights and ``spiece.model`` (a link to mtx's demo SentencePiece model):

    hf_t5_v1_0/   T5 v1.0: ReLU MLP, tied embeddings, float32, one model.safetensors
    hf_t5_v1_1/   T5 v1.1: gated GELU, untied lm_head, bfloat16, sharded with
                  model.safetensors.index.json

and ``hf_reference.npz``: for each directory, Hugging Face's float32 logits on fixed
padded inputs and its greedy ``generate`` outputs on ``INPUT_TEXTS``.

``--family llama`` writes three random decoder-only directories:

    hf_llama/    LlamaForCausalLM: grouped-query attention, "llama3" RoPE scaling, untied,
                 float32, tokenizer.model (a link to mtx's demo SentencePiece model)
    hf_qwen2/    Qwen2ForCausalLM: q/k/v biases, tied embeddings, bfloat16 sharded,
                 tokenizer.json (a tiny byte-level BPE trained here)
    hf_mistral/  MistralForCausalLM: a sliding window of 3 tokens, rope_theta 1e6, tied,
                 float32, tokenizer.model

and ``hf_llama_reference.npz``: float32 logits on ``LLAMA_IDS`` and greedy continuations
of ``LLAMA_PROMPTS``.

``--family chat`` writes ``chat_reference.json``: ``transformers``' rendering
(``apply_chat_template(tokenize=False)``) of ``CHAT_CASES`` with the hand-written
template of ``chat_template/tokenizer_config.json`` (tests/test_chat_template.py).

``--check_export DIR`` instead loads an ``mtx export`` directory with transformers and
prints the largest logit difference to the reference of ``--like`` (a fixture name, T5
or Llama family).
"""

import argparse
import json
import os

import numpy as np
import sentencepiece
import tokenizers
import torch
import transformers

DEMO_SPM = os.path.join(
  os.path.dirname(__file__), "..", "mtx", "data", "assets", "mtx_demo.model"
)
INPUT_TEXTS = ["sort: c a b", "copy: hello world", "reverse: abc"]
MAX_NEW_TOKENS = 8
# Encoder ids (0 = padding) and decoder inputs (start token 0 first) of the logits check.
ENCODER_IDS = np.array(
  [
    [5, 17, 300, 42, 9, 1, 0, 0],
    [7, 8, 9, 10, 11, 12, 13, 1],
    [100, 1, 0, 0, 0, 0, 0, 0],
  ],
  np.int64,
)
DECODER_IDS = np.array(
  [[0, 4, 5, 6, 7, 1], [0, 800, 30, 2, 1, 0], [0, 3, 0, 0, 0, 0]], np.int64
)
ARCHITECTURES = {
  "hf_t5_v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
  "hf_t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _vocabulary_ids() -> int:
  """Pieces and T5's 100 extra ids (seqio's vocab_size)."""
  return sentencepiece.SentencePieceProcessor(model_file=DEMO_SPM).get_piece_size() + 100


def _vocab_size() -> int:
  return -(-_vocabulary_ids() // 128) * 128  # padded as T5's 32128 is


def _config(name: str) -> transformers.T5Config:
  return transformers.T5Config(
    vocab_size=_vocab_size(),
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    **ARCHITECTURES[name],
  )


def _model(name: str, seed: int) -> transformers.T5ForConditionalGeneration:
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(_config(name)).eval()
  with torch.no_grad():
    # Random weights of a visible size everywhere (norm scales too), so that a wrong
    # mapping changes the logits.
    for param in model.parameters():
      param.copy_(torch.randn_like(param) * 0.5)
    if not ARCHITECTURES[name]["tie_word_embeddings"]:
      # Logits of about unit size, so that 1e-5 is a float32 tolerance.
      lm_head = torch.randn_like(model.lm_head.weight) * 0.1
      model.lm_head.weight = torch.nn.Parameter(lm_head)
  return model


def _outputs(model) -> dict:
  with torch.no_grad():
    logits = model(
      input_ids=torch.tensor(ENCODER_IDS),
      attention_mask=torch.tensor(ENCODER_IDS != 0),
      decoder_input_ids=torch.tensor(DECODER_IDS),
    ).logits.float()
    spm = sentencepiece.SentencePieceProcessor(model_file=DEMO_SPM)
    generated = []
    for text in INPUT_TEXTS:
      ids = torch.tensor([spm.encode(text) + [1]])
      out = model.generate(
        input_ids=ids,
        max_new_tokens=MAX_NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        decoder_start_token_id=0,
        eos_token_id=1,
        pad_token_id=0,
        # mtx never predicts the padding rows of the embedding (ids past the
        # vocabulary's pieces and extra ids); a random model would.
        suppress_tokens=list(range(_vocabulary_ids(), model.config.vocab_size)),
      )[0, 1:].tolist()
      generated.append(out + [0] * (MAX_NEW_TOKENS - len(out)))
  return {"logits": logits.numpy(), "generated": np.array(generated, np.int32)}


def _write(out: str, name: str, model) -> None:
  directory = os.path.join(out, name)
  v1_1 = name == "hf_t5_v1_1"
  if v1_1:
    model = model.to(torch.bfloat16)
  # A small shard size splits the v1.1 weights over several files and an index.
  model.save_pretrained(directory, max_shard_size="100KB" if v1_1 else "50MB")
  # Written as the hub's own T5 configs are (transformers 5 writes its tie flag as True).
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["tie_word_embeddings"] = ARCHITECTURES[name]["tie_word_embeddings"]
  config.pop("dtype", None)
  config["torch_dtype"] = "bfloat16" if v1_1 else "float32"
  with open(path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  spm = os.path.join(directory, "spiece.model")
  if os.path.lexists(spm):
    os.remove(spm)
  os.symlink(os.path.relpath(os.path.abspath(DEMO_SPM), directory), spm)
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(directory, extra)):
      os.remove(os.path.join(directory, extra))


# Decoder-only fixtures. Token ids of the logits check: three full rows (no padding).
LLAMA_IDS = np.array(
  [
    [5, 17, 299, 42, 9, 1, 77, 3, 250, 12],
    [7, 8, 9, 10, 11, 12, 13, 1, 2, 6],
    [100, 1, 4, 4, 4, 200, 31, 8, 19, 2],
  ],
  np.int64,
)
# Prompts of greedy decoding (one length, as mtx decodes rows in lockstep).
LLAMA_PROMPTS = np.array([[5, 17, 299, 42], [100, 1, 4, 9]], np.int64)
LLAMA_NEW_TOKENS = 6
BPE_VOCAB_SIZE = 300
LLAMA_SHAPE = dict(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=8,
  rms_norm_eps=1e-5,
  max_position_embeddings=64,
)
LLAMA_FAMILY = {
  "hf_llama": dict(
    cls="LlamaForCausalLM",
    config=dict(
      tie_word_embeddings=False,
      # A small original context so that all three bands of the scaling occur at
      # head_dim 8 (wavelengths 6, 63, 628, 6283 against 64 / 4 and 64 / 1).
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=10000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
      ),
    ),
    tokenizer="spm",
    dtype="float32",
  ),
  "hf_qwen2": dict(
    cls="Qwen2ForCausalLM",
    config=dict(
      tie_word_embeddings=True,
      use_sliding_window=False,
      rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    tokenizer="bpe",
    dtype="bfloat16",
  ),
  "hf_mistral": dict(
    cls="MistralForCausalLM",
    config=dict(
      tie_word_embeddings=True,
      sliding_window=3,
      rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
    tokenizer="spm",
    dtype="float32",
  ),
}


def _bpe_tokenizer():
  """A byte-level BPE of BPE_VOCAB_SIZE ids (256 bytes, merges, one special token)."""

  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=BPE_VOCAB_SIZE,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  corpus = INPUT_TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
  tokenizer.train_from_iterator(corpus, trainer)
  return tokenizer


def _llama_model(name: str, seed: int):
  spec = LLAMA_FAMILY[name]
  # The SentencePiece ones get the demo model's ids padded to a multiple of 128, as
  # real checkpoints pad theirs (so that the embedding splits over a tensor axis).
  spm_ids = _vocabulary_ids() - 100
  vocab_size = -(-spm_ids // 128) * 128 if spec["tokenizer"] == "spm" else BPE_VOCAB_SIZE
  cls = getattr(transformers, spec["cls"])
  config = cls.config_class(
    vocab_size=vocab_size,
    attention_dropout=0.0,
    bos_token_id=None,
    eos_token_id=1 if spec["tokenizer"] == "spm" else 0,
    pad_token_id=0,
    **LLAMA_SHAPE,
    **spec["config"],
  )
  if name == "hf_qwen2":
    config.attention_bias = True  # Qwen2 always has q/k/v biases; say so in the config
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.copy_(torch.randn_like(param) * 0.5)
    # Logits of about unit size, so that 1e-5 is a float32 tolerance.
    embed = model.model.embed_tokens.weight
    embed.copy_(torch.randn_like(embed) * 0.1)
    if not config.tie_word_embeddings:
      model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.1)
  return model


def _llama_outputs(model) -> dict:
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(LLAMA_IDS)).logits.float()
    generated = model.generate(
      input_ids=torch.tensor(LLAMA_PROMPTS),
      attention_mask=torch.ones_like(torch.tensor(LLAMA_PROMPTS)),
      max_new_tokens=LLAMA_NEW_TOKENS,
      min_new_tokens=LLAMA_NEW_TOKENS,
      do_sample=False,
      num_beams=1,
    )[:, LLAMA_PROMPTS.shape[1] :]
  return {"logits": logits.numpy(), "generated": generated.numpy().astype(np.int32)}


def _write_llama(out: str, name: str, model) -> None:
  spec = LLAMA_FAMILY[name]
  directory = os.path.join(out, name)
  if spec["dtype"] == "bfloat16":
    model = model.to(torch.bfloat16)
  sharded = spec["dtype"] == "bfloat16"
  model.save_pretrained(directory, max_shard_size="40KB" if sharded else "50MB")
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(directory, extra)):
      os.remove(os.path.join(directory, extra))
  if spec["tokenizer"] == "spm":
    link = os.path.join(directory, "tokenizer.model")
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(os.path.relpath(os.path.abspath(DEMO_SPM), directory), link)
  else:
    _bpe_tokenizer().save(os.path.join(directory, "tokenizer.json"))


def _make_llama_family(out: str) -> None:
  arrays = {}
  for seed, name in enumerate(sorted(LLAMA_FAMILY)):
    _write_llama(out, name, _llama_model(name, seed))
    cls = getattr(transformers, LLAMA_FAMILY[name]["cls"])
    loaded = cls.from_pretrained(os.path.join(out, name), dtype=torch.float32).eval()
    for key, value in _llama_outputs(loaded).items():
      arrays[f"{name}/{key}"] = value
  arrays["ids"] = LLAMA_IDS.astype(np.int32)
  arrays["prompts"] = LLAMA_PROMPTS.astype(np.int32)
  reference = os.path.join(out, "hf_llama_reference.npz")
  np.savez_compressed(reference, **arrays)
  print(f"Wrote {sorted(LLAMA_FAMILY)} and {reference}.")


def _check_llama_export(directory: str, like: str, reference: str) -> None:
  cls = getattr(transformers, LLAMA_FAMILY[like]["cls"])
  model = cls.from_pretrained(directory, dtype=torch.float32).eval()
  ref = np.load(reference)
  got = _llama_outputs(model)
  diff = np.abs(got["logits"] - ref[f"{like}/logits"]).max()
  same = np.array_equal(got["generated"], ref[f"{like}/generated"])
  print(f"max |logits - reference| = {diff:.3g}; greedy outputs equal: {same}")


def _check_export(directory: str, like: str, reference: str) -> None:
  model = transformers.T5ForConditionalGeneration.from_pretrained(
    directory, dtype=torch.float32
  ).eval()
  ref = np.load(reference)
  got = _outputs(model)
  diff = np.abs(got["logits"] - ref[f"{like}/logits"]).max()
  same = np.array_equal(got["generated"], ref[f"{like}/generated"])
  print(f"max |logits - reference| = {diff:.3g}; greedy outputs equal: {same}")


# (messages, add_generation_prompt) rendered by --family chat.
CHAT_CASES = (
  ([{"role": "user", "content": "2 + 2"}, {"role": "assistant", "content": "4"}], False),
  ([{"role": "user", "content": "  spaced out  "}], True),
  (
    [{"role": "user", "content": "copy: a b"}, {"role": "assistant", "content": "a b"}],
    False,
  ),
  ([{"role": "user", "content": "two\nlines"}], False),
)


def _make_chat_reference(out: str) -> None:
  """transformers' renderings of CHAT_CASES with the chat_template fixture."""
  directory = os.path.join(out, "chat_template")
  with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  words = tokenizers.models.WordLevel(
    {"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"
  )
  tokenizer = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tokenizers.Tokenizer(words),
    bos_token=config["bos_token"],
    eos_token=config["eos_token"],
  )
  tokenizer.chat_template = config["chat_template"]
  cases = [
    {
      "messages": messages,
      "add_generation_prompt": prompt,
      "text": tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=prompt
      ),
    }
    for messages, prompt in CHAT_CASES
  ]
  path = os.path.join(out, "chat_reference.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(cases, f, indent=1)
    f.write("\n")
  print(f"Wrote {path}.")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/fixtures")
  parser.add_argument("--check_export", default=None)
  parser.add_argument("--like", default="hf_t5_v1_1")
  parser.add_argument("--family", choices=("t5", "llama", "chat"), default="t5")
  args = parser.parse_args()
  if args.like in LLAMA_FAMILY and args.check_export:
    reference = os.path.join(args.out, "hf_llama_reference.npz")
    _check_llama_export(args.check_export, args.like, reference)
    return
  if args.family == "llama":
    _make_llama_family(args.out)
    return
  if args.family == "chat":
    _make_chat_reference(args.out)
    return
  reference = os.path.join(args.out, "hf_reference.npz")
  if args.check_export:
    _check_export(args.check_export, args.like, reference)
    return
  arrays = {}
  for seed, name in enumerate(sorted(ARCHITECTURES)):
    _write(args.out, name, _model(name, seed))
    # The reference comes from the files as written (bfloat16 weights included), run in
    # float32, as mtx runs them.
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(
      os.path.join(args.out, name), dtype=torch.float32
    ).eval()
    for key, value in _outputs(loaded).items():
      arrays[f"{name}/{key}"] = value
  arrays["encoder_ids"] = ENCODER_IDS.astype(np.int32)
  arrays["decoder_ids"] = DECODER_IDS.astype(np.int32)
  np.savez_compressed(reference, **arrays)
  print(f"Wrote {sorted(ARCHITECTURES)} and {reference}.")


if __name__ == "__main__":
  main()
