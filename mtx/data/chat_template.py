"""Chat templates: instruction examples rendered as a chat model's turns.

With ``decoder_only.PrefixLM.chat_template`` on, a decoder-only model reads each
text-to-text example as one user turn (the inputs) and one assistant turn (the targets),
rendered with the tokenizer's chat template (``tokenizer_config.json``'s
``chat_template`` next to the vocabulary file, a Jinja template rendered the way
``transformers``' ``apply_chat_template`` renders it), or with ``DEFAULT`` when the
directory has none. The loss stays on the assistant turn; inference renders the prompt
the same way with the generation prompt.

The template is rendered once, around two placeholders, and split into three pieces of
text; each piece is tokenized once and placed around every example's own tokens (the
examples are tokenized by their seqio task, as without a template)::

    render([user: U, assistant: A])          = before + U + between + A + after
    render([user: U], add_generation_prompt) = before + U + between

Worked example, ``DEFAULT`` (no BOS text, ``after`` empty), EOS id 1::

    inputs  "2 + 2"  [17, 3, 17, 1]   targets "4"  [22, 1]
      ->
    inputs  tokens("User: ") + [17, 3, 17] + tokens("\\nAssistant: ")
    targets [22] + tokens("") + [1]

The inputs' EOS is dropped (the turn markers end the prompt); the targets keep theirs
after ``after``, so decoding still stops at EOS. An example too long for the feature
lengths loses tokens of its own content, never of the template's pieces. A ``before``
that starts with the BOS text loses it: the decoder-only row starts with the start token
already (``decoder_only.PrefixLM.start_id``, the BOS of a Hugging Face vocabulary).
"""

import dataclasses
import json
from typing import Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np

from mtx import paths
from mtx.errors import UserError

# The template of a vocabulary without one: plain-text turn markers.
DEFAULT = (
  "{% for message in messages %}"
  "{% if message['role'] == 'user' %}User: {{ message['content'] }}\n"
  "{% else %}Assistant: {{ message['content'] }}{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}Assistant: {% endif %}"
)
# Placeholders for the contents while the template is split into its pieces.
_USER, _ASSISTANT = "\x02mtx-user\x03", "\x02mtx-assistant\x03"


def render(
  template: str,
  messages: Sequence[dict],
  add_generation_prompt: bool = False,
  special_tokens: Optional[dict] = None,
) -> str:
  """The template's text for ``messages``, as ``transformers``' ``apply_chat_template(
  messages, tokenize=False)`` renders it: a sandboxed Jinja environment with
  ``trim_blocks`` and ``lstrip_blocks``, ``raise_exception`` and the ``tojson`` filter,
  the special tokens (``bos_token``, ``eos_token``, ...) as variables.

  >>> render(DEFAULT, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
  'User: hi\\nAssistant: '

  Raises:
    UserError: the template does not parse or raises while rendering.
  """
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = lambda x, indent=None: json.dumps(
    x, ensure_ascii=False, indent=indent
  )
  env.globals["raise_exception"] = _raise
  # No ``strftime_now`` (transformers has it): templates that use it when defined
  # (Llama 3.2's "Today Date") then fall back to their fixed date, so a run's tokens do
  # not depend on the day it (re)started.
  try:
    return env.from_string(template).render(
      messages=list(messages),
      add_generation_prompt=add_generation_prompt,
      **(special_tokens or {}),
    )
  except jinja2.TemplateError as e:
    raise UserError(
      f"The chat template does not render ({e}); fix tokenizer_config.json's "
      "'chat_template' or turn decoder_only.PrefixLM.chat_template off."
    ) from e


def _raise(message: str):
  raise jinja2.TemplateError(message)


@dataclasses.dataclass(frozen=True)
class Pieces:
  """A template's text around the user's and the assistant's contents (module
  docstring): ``before + U + between + A + after``."""

  before: str
  between: str
  after: str

  @classmethod
  def of(cls, template: str, special_tokens: Optional[dict] = None) -> "Pieces":
    """Splits ``template``'s rendering around placeholder contents.

    Raises:
      UserError: the template changes the contents, or renders the assistant's turn
        with another header than its generation prompt (the pieces would not be the
        same in training and inference).
    """
    user = [{"role": "user", "content": _USER}]
    both = user + [{"role": "assistant", "content": _ASSISTANT}]
    full = render(template, both, False, special_tokens)
    prompt = render(template, user, True, special_tokens)
    if full.count(_USER) != 1 or full.count(_ASSISTANT) != 1 or prompt.count(_USER) != 1:
      raise UserError(
        "The chat template does not render each message's content exactly once, so "
        "mtx cannot place the examples' tokens in it; give the model a template that "
        "does, or turn decoder_only.PrefixLM.chat_template off."
      )
    before, rest = full.split(_USER)
    between, after = rest.split(_ASSISTANT)
    if prompt != before + _USER + between:
      raise UserError(
        "The chat template's generation prompt differs from its rendering of the "
        f"assistant turn ({prompt.split(_USER)[1]!r} vs {between!r}), so training and "
        "inference would differ; use a template whose two agree, or turn "
        "decoder_only.PrefixLM.chat_template off."
      )
    bos = (special_tokens or {}).get("bos_token") or ""
    if bos and before.startswith(bos):  # the row's start token is the BOS already
      before = before[len(bos) :]
    return cls(before, between, after)


def read(vocabulary) -> tuple:
  """(template, special tokens) of a vocabulary's directory: ``tokenizer_config.json``'s
  ``chat_template`` (its "default" one when it holds several) and its special tokens'
  text, or ``(DEFAULT, {})`` when the directory has no template."""
  path = getattr(vocabulary, "path", None) or getattr(
    vocabulary, "sentencepiece_model_file", None
  )
  config_path = paths.join(paths.dirname(path), "tokenizer_config.json") if path else None
  if not config_path or not paths.exists(config_path):
    return DEFAULT, {}
  config = json.loads(paths.read_text(config_path))
  template = config.get("chat_template")
  if isinstance(template, list):  # [{"name": ..., "template": ...}], as HF allows
    template = {t["name"]: t["template"] for t in template}.get("default")
  if not template:
    return DEFAULT, {}
  special = {}
  for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
    value = config.get(key)
    if isinstance(value, dict):  # an AddedToken's fields
      value = value.get("content")
    if isinstance(value, str):
      special[key] = value
  return template, special


@dataclasses.dataclass(frozen=True)
class TokenTemplate:
  """A template's pieces as token ids, placed around tokenized examples.

  Attributes:
    before, between, after: int32 ids of ``Pieces``' texts.
    eos_id: the vocabulary's EOS (dropped from the inputs, kept last in the targets).
  """

  before: np.ndarray
  between: np.ndarray
  after: np.ndarray
  eos_id: int

  @classmethod
  def for_vocabulary(cls, vocabulary) -> "TokenTemplate":
    """The template of ``vocabulary``'s directory (``read``), tokenized by it."""
    pieces = Pieces.of(*read(vocabulary))

    def ids(text: str) -> np.ndarray:
      return np.asarray(vocabulary.encode(text) if text else [], np.int32)

    return cls(
      ids(pieces.before), ids(pieces.between), ids(pieces.after), vocabulary.eos_id
    )

  def _content(self, tokens) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    return tokens[:-1] if len(tokens) and tokens[-1] == self.eos_id else tokens

  def prompt(self, inputs, length: int) -> np.ndarray:
    """``before + inputs + between`` (inputs without EOS, cut to fit ``length``).

    Raises:
      UserError: the template's pieces alone do not fit ``length``.
    """
    room = length - len(self.before) - len(self.between)
    if room < 1:
      raise UserError(
        f"The chat template's prompt takes {length - room} tokens, more than the inputs "
        f"length {length}; raise TASK_FEATURE_LENGTHS['inputs'] (or the infer/eval "
        "inputs length)."
      )
    content = self._content(inputs)[:room]
    return np.concatenate([self.before, content, self.between]).astype(np.int32)

  def answer(self, targets, length: int) -> np.ndarray:
    """``targets + after`` and the targets' EOS, cut to fit ``length``.

    Raises:
      UserError: the template's pieces alone do not fit ``length``.
    """
    eos = np.asarray([self.eos_id] if len(targets) and targets[-1] == self.eos_id else [])
    room = length - len(self.after) - len(eos)
    if room < 1:
      raise UserError(
        f"The chat template's end of turn takes {length - room} tokens, more than the "
        f"targets length {length}; raise TASK_FEATURE_LENGTHS['targets']."
      )
    content = self._content(targets)[:room]
    return np.concatenate([content, self.after, eos]).astype(np.int32)

  def example(self, inputs, targets, lengths) -> tuple:
    """(inputs, targets) of one tokenized example, rendered to fit
    ``lengths = {"inputs": Li, "targets": Lt}``."""
    return self.prompt(inputs, lengths["inputs"]), self.answer(
      targets, lengths["targets"]
    )

  def strip(self, decoded) -> np.ndarray:
    """Decoded ids without the ``after`` piece the model learned to end with (what
    precedes EOS, or the end)."""
    decoded = np.asarray(decoded, np.int32)
    n = len(self.after)
    end = np.flatnonzero(decoded == self.eos_id)
    end = int(end[0]) if len(end) else len(decoded)
    if n and end >= n and np.array_equal(decoded[end - n : end], self.after):
      return np.concatenate([decoded[: end - n], decoded[end:]])
    return decoded
