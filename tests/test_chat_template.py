"""Chat templates for decoder-only instruction tasks (mtx.data.chat_template)."""

import json
import os

import gin
import numpy as np
import pytest
import seqio

import mtx.cli.configurables  # noqa: F401  (registers the commands with gin)
from mtx.cli import main as cli
from mtx.data import chat_template, decoder_only, packing
from mtx.errors import UserError
from mtx.model import LlamaConfig
from mtx.runtime import metrics_writer
from mtx.train import build

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CHAT_DIR = os.path.join(FIXTURES, "chat_template")


@pytest.fixture(scope="module")
def vocabulary():
  return seqio.SentencePieceVocabulary(os.path.join(CHAT_DIR, "tokenizer.model"))


def test_rendering_equals_transformers_apply_chat_template(vocabulary):
  """The strings of tools/make_hf_fixtures.py --family chat (transformers 5.24)."""
  template, special = chat_template.read(vocabulary)
  assert special == {"bos_token": "<s>", "eos_token": "</s>"}
  with open(os.path.join(FIXTURES, "chat_reference.json"), encoding="utf-8") as f:
    cases = json.load(f)
  assert len(cases) == 4
  for case in cases:
    got = chat_template.render(
      template, case["messages"], case["add_generation_prompt"], special
    )
    assert got == case["text"]


def test_the_fixture_template_splits_into_its_pieces_without_the_bos(vocabulary):
  pieces = chat_template.Pieces.of(*chat_template.read(vocabulary))
  assert pieces == chat_template.Pieces("<|user|>\n", "\n<|assistant|>\n", "</s>\n")


def test_a_vocabulary_without_a_template_gets_the_default():
  vocab = seqio.SentencePieceVocabulary(
    os.path.join(FIXTURES, "hf_llama", "tokenizer.model")
  )
  template, special = chat_template.read(vocab)
  assert (template, special) == (chat_template.DEFAULT, {})
  assert chat_template.Pieces.of(template) == chat_template.Pieces(
    "User: ", "\nAssistant: ", ""
  )


def test_chat_examples_put_the_loss_on_the_assistant_turn_only(vocabulary):
  """The pipeline's example_fn renders an example as the template's turns; the
  decoder-only row then weighs exactly the answer, its end of turn and EOS."""
  options = decoder_only.PrefixLM(chat_template=True)
  lengths = {"inputs": 24, "targets": 12}
  render = build.example_fn(LlamaConfig(), vocabulary, options, lengths)
  assert (
    build.example_fn(LlamaConfig(), vocabulary, decoder_only.PrefixLM(), lengths) is None
  )
  enc, eos = vocabulary.encode, vocabulary.eos_id
  inputs, targets = render(enc("2 + 2") + [eos], enc("4") + [eos])
  want_inputs = enc("<|user|>\n") + enc("2 + 2") + enc("\n<|assistant|>\n")
  want_targets = enc("4") + enc("</s>\n") + [eos]
  assert inputs.tolist() == want_inputs and targets.tolist() == want_targets

  packer = packing.UnitPacker(1, lengths["inputs"], lengths["targets"])
  assert packer.try_add(0, inputs, targets)
  row = decoder_only.convert(packer.arrays, options.for_vocabulary(vocabulary))
  weighted = row["decoder_target_tokens"][0][row["decoder_loss_weights"][0] > 0]
  assert weighted.tolist() == want_targets


def test_a_long_example_loses_its_own_tokens_not_the_templates(vocabulary):
  template = chat_template.TokenTemplate.for_vocabulary(vocabulary)
  n = len(template.before) + len(template.between)
  prompt = template.prompt(list(range(100, 140)) + [1], n + 3)
  assert prompt.tolist() == (
    template.before.tolist() + [100, 101, 102] + template.between.tolist()
  )
  answer = template.answer(list(range(100, 140)) + [1], len(template.after) + 3)
  assert answer.tolist() == [100, 101] + template.after.tolist() + [1]
  assert template.strip(answer).tolist() == [100, 101, 1]
  with pytest.raises(UserError, match=r"more than the inputs length 3; raise .*\.$"):
    template.prompt([5, 1], 3)


def test_a_template_whose_generation_prompt_differs_is_one_sentence():
  template = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[bot] {% endif %}"
  )
  with pytest.raises(UserError, match=r"generation prompt differs.*off\.$"):
    chat_template.Pieces.of(template)


@pytest.mark.slow  # ~40 s on 2 cores: a training run, an evaluation and a decode
def test_a_chat_template_run_trains_evaluates_and_infers(tmp_path):
  """tests/llama.gin with chat_template on (the byte vocabulary has no template: the
  default's turns): train, eval and infer all run and report per task."""
  model_dir, inputs, out = tmp_path / "run", tmp_path / "in.txt", tmp_path / "out.jsonl"
  inputs.write_text("abc\n")
  common = [
    "--gin_file=tests/llama.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 40, 'targets': 16}",
    "--gin.decoder_only.PrefixLM.chat_template=True",
  ]
  assert _cli("train", *common, "--gin.TRAIN_STEPS=2", "--gin.CHECKPOINT_PERIOD=2") == 0
  last = metrics_writer.read_metrics(str(model_dir))[-1]
  assert last["step"] == 2 and np.isfinite(last["loss/tiny_copy"])
  assert _cli("eval", *common, "--gin.EVAL_BATCH_SIZE=8") == 0
  result = json.loads((model_dir / "eval" / "step_2.json").read_text())
  assert "tiny_copy" in json.dumps(result)
  infer = [
    f"--gin.INFER_INPUT='{inputs}'",
    f"--gin.INFER_OUTPUT='{out}'",
    "--gin.INFER_TASK='tiny_copy'",
    "--gin.INFER_MAX_DECODE_LENGTH=4",
  ]
  assert _cli("infer", *common, *infer) == 0
  assert len(out.read_text().splitlines()) == 1


def _cli(*args):
  gin.clear_config()
  try:
    return cli.run(list(args))
  finally:
    gin.clear_config()
