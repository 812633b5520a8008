"""The Cortex chat format as a Jinja chat template, for Hugging Face tokenizers and GGUF files.

It renders what serving/chat.py build_prompt encodes (without its trimming of long histories):
    <system>S</s><user>Q1 /no think</s><assistant><think> </think><answer>A1</answer></s><user>Q2 /think</s><assistant><think>
* the system prompt is the first message's if it is a system message, else a single space;
* each user turn ends with the soft switch " /think" or " /no think" (replacing one already there): from the reply that
  follows it (a non-empty `think`/`reasoning_content` means thinking), else for the last message from
  `enable_thinking` (default true), else its own switch or `enable_thinking`;
* assistant turns are `<think>T</think><answer>A</answer>` with T a single space when absent; assistant messages before
  the first user message are dropped;
* the generation prompt is `<assistant><think>` (thinking) or `<assistant><think> </think>` (no thinking).
"""

CHAT_TEMPLATE = (
    "{%- set thinking = enable_thinking if enable_thinking is defined and enable_thinking is not none else true -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set chat = messages[1:] -%}"
    "{%- else -%}{%- set system = ' ' -%}{%- set chat = messages -%}{%- endif -%}"
    "{{- '<system>' + system + '</s>' -}}"
    "{%- set state = namespace(started=false) -%}"
    "{%- for message in chat -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set state.started = true -%}"
    "{%- set text = message['content'] -%}{%- set own = none -%}"
    "{%- if text.endswith(' /think') -%}{%- set text = text[:-7] -%}{%- set own = true -%}"
    "{%- elif text.endswith(' /no think') -%}{%- set text = text[:-10] -%}{%- set own = false -%}{%- endif -%}"
    "{%- set reply = chat[loop.index0 + 1] if not loop.last else none -%}"
    "{%- if reply is not none and reply['role'] == 'assistant' -%}"
    "{%- set switch = ((reply.get('think') or reply.get('reasoning_content') or '') | trim | length) > 0 -%}"
    "{%- elif loop.last or own is none -%}{%- set switch = thinking -%}"
    "{%- else -%}{%- set switch = own -%}{%- endif -%}"
    "{{- '<user>' + text + (' /think' if switch else ' /no think') + '</s>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if state.started -%}"
    "{{- '<assistant><think>' + (message.get('think') or message.get('reasoning_content') or ' ') + '</think><answer>'"
    " + message['content'] + '</answer></s>' -}}"
    "{%- endif -%}"
    "{%- else -%}{{- raise_exception('Cortex chats have system (first only), user and assistant messages, got '"
    " + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<assistant><think>' if thinking else '<assistant><think> </think>' -}}"
    "{%- endif -%}"
)
