"""How a conversation becomes text and token ids: the one home of chat templates.

    chat = Chat(chat_template_for(meta), tokenizer)      # the checkpoint's own template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat.render(messages, add_generation_prompt=True)   # the text the model continues
    ids, trained = chat.encode(messages + [{"role": "assistant", "content": "Paris."}])  # for SFT
    chat.stop_ids                                       # generation ends on one of these

A conversation is a list of {role, content} messages (roles: system, user, assistant). A chat template
(Jinja, the format Hugging Face and llama.cpp use) turns it into text. Which template a checkpoint uses:
  - an imported model (convert.py from-hf / from-gguf): its own, kept in meta["chat_template"];
  - a model fine-tuned here on our own models: the Alpaca instruction template (format_instruction);
  - a base model without one: none, its prompts are used as written.
Rendering runs in the same Jinja environment transformers' apply_chat_template uses (sandboxed,
trim_blocks, lstrip_blocks, raise_exception, tojson, strftime_now), so the text is the same.

infer.py, explore.py and finetune.py all go through `Chat`: the model is prompted at inference exactly
as it was trained.
"""

import json
import os
from datetime import datetime
from functools import lru_cache

from cli import UsageError, first_line_of
from tokenizer import tokenizer_setting

# ---------------------------------------------------------------------------------------------
# The Alpaca instruction template (our own models) and where a checkpoint's template comes from
# ---------------------------------------------------------------------------------------------


def format_instruction(instruction: str, input_text: str = "") -> str:
    """The Alpaca-style prompt: everything up to and including the "### Response:" header."""
    prompt = f"### Instruction:\n{instruction.strip()}\n\n"
    if input_text and input_text.strip():
        prompt += f"### Input:\n{input_text.strip()}\n\n"
    return prompt + "### Response:\n"


# The instruction template as a chat template. __HEAD__, __INPUT__ and __RESPONSE__ stand for the literal
# text of format_instruction (filled in by instruction_chat_template). Every tag strips the
# whitespace around it ({%- -%}), so the layout below adds nothing to what it renders.
CHAT_TEMPLATE = r"""
{%- if messages and messages[0].role == 'system' -%}
    {%- set system = messages[0].content | trim -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role not in ['user', 'assistant'] or (message.role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('this model takes user and assistant turns in turn, user first (a system message may lead)') -}}
    {%- elif message.role == 'user' -%}
        {%- set instruction = message.content | trim -%}
        {%- if loop.first and system -%}
            {%- set instruction = system + '\n\n' + instruction -%}
        {%- endif -%}
        {{- __HEAD__ + instruction -}}
        {%- if message.input is defined and message.input and (message.input | trim) -%}
            {{- __INPUT__ + (message.input | trim) -}}
        {%- endif -%}
    {%- else -%}
        {{- __RESPONSE__ + message.content + eos_token -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- __RESPONSE__ -}}
{%- endif -%}
"""


def instruction_chat_template() -> str:
    """format_instruction as a Jinja chat template, its literal text taken from the function itself.

    format_instruction(I) = HEAD + I + RESPONSE and format_instruction(I, N) = HEAD + I + INPUT + N + RESPONSE,
    so rendering it around marker strings yields HEAD ("### Instruction:\n"), INPUT ("\n\n### Input:\n")
    and RESPONSE ("\n\n### Response:\n"). Messages then render as:
      user       HEAD + content, then INPUT + message["input"] when the message has a non-blank "input";
      assistant  RESPONSE + content + EOS (a finished turn, as finetune.py trains it);
      generation prompt: RESPONSE.
    So [user q] with add_generation_prompt renders format_instruction(q). A leading system message becomes
    the first paragraph of the first instruction: the model never saw system prompts, but llama.cpp renders
    one through every template it loads (and falls back to another template if that fails). Any other
    order of roles is refused.
    """
    instruction, input_text = "\x00instruction\x00", "\x00input\x00"
    head, response = format_instruction(instruction).split(instruction)
    with_input = format_instruction(instruction, input_text)
    input_head = with_input[len(head + instruction):with_input.index(input_text)]
    assert with_input == head + instruction + input_head + input_text + response, "format_instruction changed shape"
    template = CHAT_TEMPLATE.strip()
    for name, text in (("__HEAD__", head), ("__INPUT__", input_head), ("__RESPONSE__", response)):
        template = template.replace(name, "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'")
    return template


def chat_template_for(meta: dict):
    """The template a checkpoint is prompted (and exported) with: the one it carries (an imported model's,
    or the one SFT trained it on), else ours for a model fine-tuned here (kind "sft"), else none."""
    return meta.get("chat_template") or (instruction_chat_template() if meta.get("kind") == "sft" else None)


def imported_chat_template(folder: str):
    """The chat template a Hugging Face tokenizer folder ships: chat_template.jinja (written by recent
    transformers), else tokenizer_config.json's "chat_template" (a string, or a list of named ones)."""
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return tokenizer_setting(folder, "chat_template")


# ---------------------------------------------------------------------------------------------
# Messages -> text
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def compiled(template: str):
    """The template compiled in transformers' environment (a sandbox: templates from the Hub are untrusted code)."""
    import jinja2  # only chat models pay for the import
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    # Jinja's own tojson escapes HTML characters; a prompt wants the JSON as it is.
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UsageError(f"the chat template does not compile ({first_line_of(e)}, line {e.lineno})") from None


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
    """The conversation as text: what apply_chat_template(messages, tokenize=False) gives for this template.
    variables: bos_token, eos_token and anything else the template reads."""
    import jinja2

    try:
        return compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"the chat template refuses this conversation: {first_line_of(e)}") from None


# ---------------------------------------------------------------------------------------------
# A template with its tokenizer: text and token ids, for inference and for training
# ---------------------------------------------------------------------------------------------


class Chat:
    """A chat template bound to the tokenizer of its model.

    end_of_turn: what the template writes right after a finished assistant reply, whitespace stripped
    ("<|im_end|>" for ChatML, the EOS for ours): the model ends its reply by producing it.
    stop_ids: the token ids that end a reply (the EOS, and end_of_turn when it is one token).
    stops: texts that end a reply too: end_of_turn when it is several tokens, and the text that opens the
    next user turn (ours: "### Instruction:"; small models that miss their EOS often start one).
    """

    def __init__(self, template: str, tokenizer):
        self.template, self.tokenizer = template, tokenizer
        self.variables = {"eos_token": tokenizer.backend.id_to_token(tokenizer.eos_id)}
        if tokenizer.bos_id is not None:
            self.variables["bos_token"] = tokenizer.backend.id_to_token(tokenizer.bos_id)
        # Render a short conversation around markers and read the turn boundaries off the text.
        first, reply, second = "\x01first\x01", "\x01reply\x01", "\x01second\x01"
        conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": reply}]
        after_reply = self.render(conversation).split(reply)[-1]  # ChatML: "<|im_end|>\n"
        self.end_of_turn = after_reply.strip()
        next_turn = self.render(conversation + [{"role": "user", "content": second}]).split(reply)[-1]
        next_user = next_turn.split(second)[0][len(after_reply):].strip()  # ChatML: "<|im_start|>user"
        eot_ids = tokenizer.encode(self.end_of_turn) if self.end_of_turn else []
        self.stop_ids = {tokenizer.eos_id, *(eot_ids if len(eot_ids) == 1 else [])}
        self.stops = [text for text in (self.end_of_turn if len(eot_ids) > 1 else "", next_user) if text]
        # Does the template show a user message's "input" (ours does, under "### Input:")?
        probe = [{"role": "user", "content": first, "input": second}]
        self.renders_input = second in self.render(probe, add_generation_prompt=True)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return render(self.template, messages, add_generation_prompt, **self.variables)

    def user_message(self, instruction: str, input_text: str = "") -> dict:
        """An instruction record's prompt as a user message: our template shows the input under its own
        header, any other gets it as a second paragraph of the content."""
        if not input_text.strip():
            return {"role": "user", "content": instruction}
        if self.renders_input:
            return {"role": "user", "content": instruction, "input": input_text}
        return {"role": "user", "content": f"{instruction.strip()}\n\n{input_text.strip()}"}

    def encode(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """(ids, trained): the conversation's token ids, and which of them a model learns to produce.

        Trained: each assistant reply up to and including its end-of-turn token; everything else is
        context. The text is rendered prefix by prefix (the prompt up to each reply with the generation
        prompt, then the reply) and each piece is encoded on its own: a prompt is encoded exactly as
        inference encodes it (one string), never merged with the first tokens of its reply.
        """
        ids, trained, done = [], [], ""

        def add(upto: str, text_is_reply: bool):
            nonlocal done
            if not upto.startswith(done):
                raise UsageError("this chat template renders a conversation differently once a later turn is added, "
                                 "so its replies cannot be told apart from their prompts: use another template")
            piece = self.tokenizer.encode(upto[len(done):])
            ids.extend(piece)
            trained.extend([text_is_reply] * len(piece))
            done = upto

        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                add(self.render(messages[:i], add_generation_prompt=True), False)
                turn = self.render(messages[:i + 1])
                end = turn.rfind(self.end_of_turn, len(done)) if self.end_of_turn else -1
                add(turn[:end + len(self.end_of_turn)] if end >= 0 else turn, True)  # after it: the next turn's context
        add(self.render(messages, add_generation_prompt), False)
        return ids, trained


def check_messages(messages) -> list[dict]:
    """messages if they are a conversation ({role, content} objects, roles system/user/assistant), else a UsageError."""
    if not isinstance(messages, list) or not messages:
        raise UsageError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise UsageError(f"each message needs a role of system, user or assistant, got {message!r:.60}")
        if not isinstance(message.get("content"), str):
            raise UsageError(f"a {message['role']} message has no text content (\"content\" must be a string)")
    return messages
