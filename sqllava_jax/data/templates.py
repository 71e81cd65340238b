"""Conversation templates `plain`, `vicuna_v1`, `v1_sq`: prompt strings and trained spans.

A conversation is a list of turns `(role, text)` with roles `user`, `assistant` and `vuser`
(the virtual user of self-questioning). `render_segments` lays a conversation out as the
reference prompt, cut into segments that each know whether they carry loss; `build_prompt`
is the same layout as one string, optionally ending with the tag of the role that speaks
next (what generation continues from):

  vicuna_v1 / v1_sq:  SYSTEM USER: <image>\\nQ1 ASSISTANT: A1</s>VUSER: Q2</s> ASSISTANT: A2</s>
  plain:              <image>A caption.\\n

Loss falls on assistant answers with their `</s>`, on VUSER questions with their `</s>`, and
on plain captions with their newline; never on the system prompt, USER turns, role tags or
the image (llava `train.py`, `preprocess_v1`, `preprocess_v1_sq2`, `preprocess_plain`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

from sqllava_jax.data.errors import BadRecord
from sqllava_jax.data.tokenizer import IMAGE_TOKEN

USER, ASSISTANT, VUSER = "user", "assistant", "vuser"
EOS_TEXT = "</s>"

# Prompt text is part of what the released checkpoints were trained on, so these strings
# must match the reference byte for byte, including the missing space after "questions."
# in the self-questioning prompt (llava `conversation.py`, conv_vicuna_v1 / conv_vicuna_v1_sq).
_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's "
                  "questions.")
_SQ_SYSTEM = (_VICUNA_SYSTEM +
              "Also, the artificial intelligence assistant is a curious virtual user. The "
              "virtual user asks complex questions that are relevant to the content in the "
              "image, for example, asking about background knowledge of the objects in the "
              "image, asking to discuss about events happening in the image, etc. Again, do "
              "not ask about uncertain details.")


@dataclasses.dataclass(frozen=True)
class Template:
  """How turns become a prompt. `sep` follows user-side turns, `sep2` assistant turns."""
  name: str
  style: Literal["plain", "chat"]
  system: str
  role_names: tuple[tuple[str, str], ...]
  sep: str
  sep2: str

  @property
  def roles(self) -> tuple[str, ...]:
    return tuple(r for r, _ in self.role_names)

  def role_name(self, role: str) -> str:
    for r, name in self.role_names:
      if r == role:
        return name
    raise BadRecord("template_mismatch",
                    f"template {self.name!r} has no role {role!r} (roles: {', '.join(self.roles)})")


TEMPLATES = {
    "plain": Template("plain", "plain", "", ((USER, ""), (ASSISTANT, "")), sep="\n", sep2="\n"),
    "vicuna_v1": Template("vicuna_v1", "chat", _VICUNA_SYSTEM,
                          ((USER, "USER"), (ASSISTANT, "ASSISTANT")), sep=" ", sep2=EOS_TEXT),
    "v1_sq": Template("v1_sq", "chat", _SQ_SYSTEM,
                      ((USER, "USER"), (ASSISTANT, "ASSISTANT"), (VUSER, "VUSER")),
                      sep=" ", sep2=EOS_TEXT),
}


def get_template(name: str | Template) -> Template:
  if isinstance(name, Template):
    return name
  if name not in TEMPLATES:
    raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
  return TEMPLATES[name]


@dataclasses.dataclass(frozen=True)
class Segment:
  """A run of prompt text that tokenises on its own and either carries loss or not.

  kind: 'bos', 'eos' (the `</s>` separator), 'image' (the `<image>` placeholder) or 'text'.
  A text segment that directly follows another text segment starts with the one space that
  SentencePiece's dummy prefix stands for, so it is encoded without that space.
  """
  kind: Literal["bos", "eos", "image", "text"]
  text: str
  trained: bool
  role: Optional[str] = None
  turn: int = -1


class _Layout:
  """Accumulates untrained text and emits segments, cutting at `<image>`."""

  def __init__(self) -> None:
    self.segments: list[Segment] = [Segment("bos", "", False)]
    self.pending = ""
    self.pending_role: Optional[str] = None
    self.pending_turn = -1

  def add_untrained(self, text: str, role: Optional[str], turn: int) -> None:
    if not self.pending:
      self.pending_role, self.pending_turn = role, turn
    self.pending += text

  def flush(self) -> None:
    for i, chunk in enumerate(self.pending.split(IMAGE_TOKEN)):
      if i:
        self.segments.append(Segment("image", IMAGE_TOKEN, False, self.pending_role,
                                     self.pending_turn))
      if chunk:
        self.segments.append(Segment("text", chunk, False, self.pending_role, self.pending_turn))
    self.pending = ""

  def add_trained(self, text: str, role: str, turn: int) -> None:
    self.flush()
    self.segments.append(Segment("text", text, True, role, turn))

  def add_eos(self, role: str, turn: int) -> None:
    self.flush()
    self.segments.append(Segment("eos", EOS_TEXT, True, role, turn))


def check_turn_order(template: Template, turns: Sequence[tuple[str, str]], *,
                     next_role: Optional[str] = None) -> None:
  """User-side turns (user, vuser) at even positions, assistant at odd, user first.

  A training conversation (`next_role` None) ends with the assistant; a generation prompt
  continues with `next_role`.
  """
  roles = [r for r, _ in turns] + ([next_role] if next_role else [])
  if not turns:
    raise BadRecord("malformed_record", "the conversation has no turns")
  for i, role in enumerate(roles):
    template.role_name(role)
    expected = (USER, VUSER) if i % 2 == 0 else (ASSISTANT,)
    if role not in expected or (i == 0 and role != USER):
      order = " -> ".join(roles)
      raise BadRecord("roles_out_of_order", f"turn {i} is {role!r} in the order {order}")
  if next_role is None and roles[-1] != ASSISTANT:
    raise BadRecord("roles_out_of_order",
                    f"the last turn is {roles[-1]!r}; a training conversation ends with an answer")


def render_segments(template: str | Template, turns: Sequence[tuple[str, str]], *,
                    next_role: Optional[str] = None,
                    system: Optional[str] = None) -> list[Segment]:
  """The prompt of `turns` as segments (training: `next_role` None; generation: the role
  whose tag ends the prompt). `system` replaces the template's system prompt (a record's
  own, see `records`). Raises `BadRecord` for turns the template cannot lay out."""
  template = get_template(template)
  check_turn_order(template, turns, next_role=next_role)
  if template.style == "plain":
    if system is not None:
      raise BadRecord("template_mismatch",
                      f"the record sets a system prompt, which template {template.name!r} has "
                      "no place for")
    return _plain_segments(template, turns, next_role)
  out = _Layout()
  out.add_untrained((template.system if system is None else system) + template.sep, None, -1)
  for i, (role, text) in enumerate(turns):
    tag = template.role_name(role) + ":"
    if role == USER:
      out.add_untrained(f"{tag} {text}{template.sep}", role, i)
    elif role == VUSER:
      # A VUSER question is trained like an answer and closed by `</s>`; the reference
      # writes it as `VUSER: Q</s>` followed by the user-side separator.
      out.add_untrained(tag, role, i)
      out.add_trained(" " + text, role, i)
      out.add_eos(role, i)
      out.add_untrained(template.sep, role, i)
    else:
      out.add_untrained(tag, role, i)
      out.add_trained(" " + text, role, i)
      out.add_eos(role, i)
  if next_role is not None:
    out.add_untrained(template.role_name(next_role) + ":", next_role, len(turns))
  out.flush()
  return out.segments


def _plain_segments(template: Template, turns, next_role) -> list[Segment]:
  # Stage 1 keeps only the image of the first turn and trains on the caption (llava
  # `preprocess_plain`): `<image>` + caption + "\n", with no system prompt and no `</s>`.
  if len(turns) + (next_role is not None) != 2 or IMAGE_TOKEN not in turns[0][1]:
    raise BadRecord("template_mismatch",
                    f"'plain' needs [human with <image>, gpt], got {len(turns)} turn(s)")
  segments = [Segment("bos", "", False), Segment("image", IMAGE_TOKEN, False, USER, 0)]
  if next_role is None:
    segments.append(Segment("text", turns[1][1] + template.sep2, True, ASSISTANT, 1))
  return segments


def build_prompt(template: str | Template, turns: Sequence[tuple[str, str]], *,
                 next_role: Optional[str] = None) -> str:
  """The prompt text, e.g. `build_prompt('v1_sq', [(USER, '<image>\\nDescribe it.')],
  next_role=ASSISTANT)` ends in `ASSISTANT:`; `[..., (ASSISTANT, a)]` with `next_role=VUSER`
  ends in `a</s>VUSER:` (the self-questioning prompt)."""
  return "".join(s.text for s in render_segments(template, turns, next_role=next_role))
