"""Writes the tiny Hugging Face T5 fixtures of tests/test_hf_checkpoint.py (run once).

Needs torch, transformers, sentencepiece and safetensors, which mtx itself never imports:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers sentencepiece
    /tmp/ref/bin/python tools/make_hf_fixtures.py --out tests/fixtures

writes two random ``T5ForConditionalGeneration`` directories, each with config.json,
safetensors weights and ``spiece.model`` (a link to mtx's demo SentencePiece model):

    hf_t5_v1_0/   T5 v1.0: ReLU MLP, tied embeddings, float32, one model.safetensors
    hf_t5_v1_1/   T5 v1.1: gated GELU, untied lm_head, bfloat16, sharded with
                  model.safetensors.index.json

and ``hf_reference.npz``: for each directory, Hugging Face's float32 logits on fixed
padded inputs and its greedy ``generate`` outputs on ``INPUT_TEXTS``.

``--check_export DIR`` instead loads an ``mtx export`` directory with transformers and
prints the largest logit difference to the reference of ``--like`` (a fixture name).
"""

import argparse
import json
import os

import numpy as np
import sentencepiece
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


def _check_export(directory: str, like: str, reference: str) -> None:
  model = transformers.T5ForConditionalGeneration.from_pretrained(
    directory, dtype=torch.float32
  ).eval()
  ref = np.load(reference)
  got = _outputs(model)
  diff = np.abs(got["logits"] - ref[f"{like}/logits"]).max()
  same = np.array_equal(got["generated"], ref[f"{like}/generated"])
  print(f"max |logits - reference| = {diff:.3g}; greedy outputs equal: {same}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/fixtures")
  parser.add_argument("--check_export", default=None)
  parser.add_argument("--like", default="hf_t5_v1_1")
  args = parser.parse_args()
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
