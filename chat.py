"""Talk to a chat model in the terminal: a multi-turn Korean conversation, streamed token by token.

    python chat.py --ckpt out-sft/last.pt
    python chat.py --ckpt out-sft/last.pt --system "당신은 친절한 한국어 조수입니다."
    python chat.py --ckpt out-sft/last.pt --prompt "한국의 수도는 어디인가요?" --temperature 0 --max-new-tokens 64

Each line is a message (a line ending in a backslash goes on to the next); the reply streams as it is
generated and ends at <|im_end|>. /clear starts the conversation over (the system message stays),
/exit or Ctrl-D ends it, Ctrl-C stops a reply. With --prompt it answers one message and prints the
reply alone, for scripts and pipes. Notes go to stderr, the conversation to stdout.
"""

import argparse
import sys

import torch

from nanokor.chat_format import require_chat_tokens
from nanokor.chat_session import ChatSession
from nanokor.checkpoint import build_model, build_tokenizer, load_checkpoint
from nanokor.errors import NanokorError, exit_on_error, exit_streaming
from nanokor.generate import Decoder, StreamDecoder
from sample import add_generation_args, resolve_generation_args, sampling_of

COMMANDS = {"/clear": "forget the conversation (the system message stays)",
            "/exit": "end the chat (Ctrl-D too; Ctrl-C stops a reply)",
            "/help": "this list"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="chat checkpoint (SFT), e.g. out-sft/last.pt")
    p.add_argument("--system", help="system message that starts the conversation (default: none)")
    p.add_argument("--prompt", help="answer this one message, print the reply alone and exit")
    add_generation_args(p, max_new_tokens=512)
    return resolve_generation_args(p, p.parse_args(argv))


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def open_session(args) -> ChatSession:
    ckpt = load_checkpoint(args.ckpt)
    tokenizer = build_tokenizer(ckpt)
    require_chat_tokens(tokenizer, args.ckpt)
    if not ckpt.get("chat", False):
        # Allowed, to see what a base model makes of the format; its replies are continuations, not answers.
        print(f"warning: {args.ckpt} is a base model, not fine-tuned to chat (train.py config/sft.py "
              "--init_from=... makes one), so its replies continue the text rather than answer.", file=sys.stderr)
    model = build_model(ckpt).to(args.device, args.dtype)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    return ChatSession(Decoder(model, args.decode_mode), tokenizer, system=args.system,
                       max_new_tokens=args.max_new_tokens, sampling=sampling_of(args), generator=generator,
                       note=note)


def say(session: ChatSession, text: str, out) -> None:
    """Stream the reply to `text`, then end its line."""
    reply = session.reply(text)  # a message that cannot be sent fails here, before anything is printed
    stream = StreamDecoder(session.tokenizer)
    try:
        for token in reply:
            out.write(stream.push(token))
            out.flush()
    finally:  # Ctrl-C included: what was said stays said, and the line ends
        out.write(stream.flush() + "\n")
        out.flush()


def read_message(tty: bool) -> str | None:
    """The next message (lines ending in a backslash continue it), or None at the end of the input."""
    lines = []
    while True:
        if tty:
            try:
                line = input(">>> " if not lines else "... ")
            except EOFError:
                return None
        else:
            raw = sys.stdin.buffer.readline()
            if not raw:
                return None
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if "\ufffd" in line and b"\xef\xbf\xbd" not in raw:
                note("this line is not valid UTF-8 (CP949/EUC-KR?); undecodable bytes became U+FFFD. Convert the "
                     "input with `iconv -f cp949 -t utf-8`.")
        if not line.endswith("\\"):
            return "\n".join([*lines, line])
        lines.append(line[:-1])


def converse(session: ChatSession, out) -> int:
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        c = session.decoder.model.config
        print(f"nanokor chat: {c.n_layer} layers, {c.max_seq_len}-token context. "
              + "; ".join(f"{k} {v}" for k, v in COMMANDS.items()) + ".", file=sys.stderr)
    while True:
        try:
            text = read_message(tty)
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat, as in sample.py
            print(file=sys.stderr)
            return 130
        if text is None or text.strip() == "/exit":
            return 0
        command = text.strip()
        if not command:
            continue
        if command == "/clear":
            session.clear()
            note("conversation cleared" + (" (the system message stays)" if session.system is not None else ""))
        elif command.startswith("/") and " " not in command:  # a command: never sent to the model
            unknown = "" if command == "/help" else f"unknown command {command}; "
            note(unknown + "; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
        else:
            try:
                say(session, text, out)
            except KeyboardInterrupt:
                note("reply stopped; it stays in the conversation as far as it went")
            except NanokorError as e:  # e.g. a message too long for the context: the chat goes on
                print(f"error: {e}", file=sys.stderr)
            if tty:
                out.write("\n")


def main(argv=None) -> int:
    """The command: its exit code, with a NanokorError as one paragraph on stderr."""
    return exit_on_error(chat, parse_args(argv))


def chat(args) -> int:
    out = sys.stdout
    if hasattr(out, "reconfigure"):  # Korean text is UTF-8 whatever the locale (LANG=C would fail)
        out.reconfigure(encoding="utf-8")
    session = open_session(args)
    if args.prompt is not None:
        say(session, args.prompt, out)
        return 0
    return converse(session, out)


if __name__ == "__main__":
    sys.exit(exit_streaming(main))
