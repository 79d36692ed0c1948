"""Chat data -> token + label datasets through the tokenizer's chat template (gpt-neox's tool of the same name).

    python tools/preprocess_data_with_chat_template.py --input chats.jsonl --jsonl-keys messages \\
        --tokenizer-path checkpoints/SmolLM2-135M-Instruct --output-prefix data/sft/chats

Each --jsonl-keys value is a list of {"role", "content"} messages. Turn by turn, the conversation so far is rendered
by transformers' apply_chat_template (with the generation prompt when the next turn is --generation-role's); the
new tokens of a turn are trained (label = token) when the turn is the generation role's, else masked (label -100).
--only-last masks every turn but the last; --no-mask trains the whole rendered chat (labels = tokens); --for-rm
masks everything and appends EOS twice, the second one trained: the reward model scores that last token. After the
chat, EOS is appended (trained if the last turn was). Outputs, per key (as gpt-neox names them):
{prefix}_{key}_document (tokens), {prefix}_{key}_label_document (labels) and, with --reward-key,
{prefix}_{key}_reward_document (one int32 reward per document; --binary-reward: 1 for true, -1 for false).

Config: train_data_paths [{prefix}_messages_document] and train_label_data_paths [{prefix}_messages_label_document]
for SFT; for pairs (--jsonl-keys chosen rejected) pos_train_data_paths/neg_train_data_paths and their label lists,
with dataset_impl: pairwise.

Each turn's tokens must extend the previous render's (true of chat templates that close every turn with a special
token, such as ChatML's <|im_end|>); a template whose render of a longer conversation retokenizes an earlier turn is
reported with the record, as masks cut at a moved boundary would train the wrong tokens.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from neox.data.sources import InputError
from tools.labelled_data import (LABEL_MASK, Document, LazyTokenizer, add_common_args, check_common_args, encode_inputs,
                                 outputs_for, run_tool)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preprocess_data_with_chat_template.py", description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="comma-separated input files, globs, directories or HF datasets directories "
                       "(JSON lines, parquet or HF datasets)")
    group.add_argument("--jsonl-keys", nargs="+", default=["conversation"],
                       help="keys holding message lists; one output per key (default: conversation)")
    group.add_argument("--no-mask", action="store_true", help="train every token (the labels equal the tokens)")
    group.add_argument("--for-rm", action="store_true",
                       help="reward-model data: every token masked, EOS appended twice and the last one trained")
    group.add_argument("--generation-role", default="assistant",
                       help="the role whose turns are trained (default: assistant)")
    group.add_argument("--only-last", action="store_true", help="train only the last turn")
    group.add_argument("--reward-key", default=None, help="key of each record's reward (writes a reward dataset)")
    group.add_argument("--binary-reward", action="store_true", help="the reward is a boolean: true -> 1, false -> -1")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-path", required=True,
                       help="Hugging Face tokenizer directory (or hub name in the local cache) with a chat template")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx and friends")
    add_common_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    check_common_args(args)
    if len(set(args.jsonl_keys)) != len(args.jsonl_keys):
        raise InputError(f"--jsonl-keys lists a key twice: {args.jsonl_keys}")
    if args.reward_key is not None and args.reward_key in args.jsonl_keys:
        raise InputError(f"--reward-key {args.reward_key!r} is also a --jsonl-keys entry")
    if args.no_mask and args.for_rm:
        raise InputError("--no-mask and --for-rm contradict each other: --for-rm masks all but the last token")
    if args.binary_reward and args.reward_key is None:
        raise InputError("--binary-reward reads the reward under --reward-key: set it")


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise InputError(f"--tokenizer-path {path!r}: cannot load a Hugging Face tokenizer ({err})") from None
    if not tokenizer.chat_template:
        raise InputError(f"--tokenizer-path {path!r}: the tokenizer has no chat template (tokenizer_config.json "
                         "'chat_template', or chat_template.jinja)")
    return tokenizer


class ChatEncoder(LazyTokenizer):
    """One record -> {key: Document}."""

    def __init__(self, args: argparse.Namespace):
        self.keys, self.reward_key = list(args.jsonl_keys), args.reward_key
        self.tokenizer_path, self.generation_role = args.tokenizer_path, args.generation_role
        self.mask, self.only_last, self.for_rm = not args.no_mask, args.only_last, args.for_rm
        self.binary_reward, self.ftfy = args.binary_reward, args.ftfy

    def build_tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def __call__(self, record: tuple) -> dict[str, Document]:
        reward = self._reward(record[-1]) if self.reward_key is not None else None
        return {key: Document(*self.encode(self._messages(key, value)), reward=reward)
                for key, value in zip(self.keys, record)}

    def _messages(self, key: str, value: Any) -> list[dict]:
        if not isinstance(value, list) or not value or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in value):
            raise InputError(f"--jsonl-keys {key!r}: expected a non-empty list of {{'role': str, 'content': str}} "
                             f"messages, got {str(value)[:200]}")
        if self.ftfy:
            import ftfy

            return [{**m, "content": ftfy.fix_text(m["content"])} for m in value]
        return value

    def _reward(self, value: Any) -> int:
        if self.binary_reward:
            if not isinstance(value, bool):
                raise InputError(f"--binary-reward: reward {value!r} under {self.reward_key!r} is not true/false")
            return 1 if value else -1
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise InputError(f"reward {value!r} under {self.reward_key!r}: the reward dataset holds integers (int32, "
                             "gpt-neox's layout; KTO reads > 0 as desirable, < 0 as undesirable); use integer "
                             "rewards or --binary-reward")
        return int(value)

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                                       return_dict=False))

    def encode(self, chat: list[dict]) -> tuple[list[int], list[int] | None]:
        """(tokens, labels) of one conversation, as gpt-neox's build_chat makes them."""
        eos = self.tokenizer.eos_token_id
        if not self.mask:
            tokens = self._render(chat)
            return tokens, list(tokens)
        if self.for_rm:
            if eos is None:
                raise InputError(f"--for-rm: the tokenizer at {self.tokenizer_path} has no EOS token to score")
            tokens = self._render(chat)
            # Inputs are tokens[:-1] and targets labels[1:]: the final EOS is the one target trained.
            return tokens + [eos, eos], [LABEL_MASK] * (len(tokens) + 1) + [eos]
        tokens: list[int] = []
        labels: list[int] = []
        for i, turn in enumerate(chat):
            last = i == len(chat) - 1
            prompt_next = not last and chat[i + 1]["role"] == self.generation_role
            rendered = self._render(chat[: i + 1], generation_prompt=prompt_next)
            if rendered[: len(tokens)] != tokens:
                raise InputError(f"the chat template re-tokenizes turn {i - 1} when turn {i} is added (the render of a "
                                 "longer conversation does not extend the shorter one's), so turn masks cannot be "
                                 f"cut: {str(chat)[:200]}")
            new = rendered[len(tokens):]
            trained = turn["role"] == self.generation_role and (last or not self.only_last)
            tokens += new
            labels += new if trained else [LABEL_MASK] * len(new)
        if eos is not None:
            tokens.append(eos)
            labels.append(eos if labels and labels[-1] != LABEL_MASK else LABEL_MASK)
        return tokens, labels


def run(args: argparse.Namespace):
    check_args(args)
    encoder = ChatEncoder(args)
    tokenizer = encoder.tokenizer  # fail on a bad tokenizer before reading anything
    # --no-mask still writes the (all-trained) label dataset, as gpt-neox does: configs name it either way.
    outputs = outputs_for(args.output_prefix, args.jsonl_keys, rewards=args.reward_key is not None)
    keys = list(args.jsonl_keys) + ([args.reward_key] if args.reward_key is not None else [])
    return encode_inputs(args, keys, encoder, outputs, f"tokenizer {args.tokenizer_path}: vocab size {len(tokenizer)}",
                         tokenizer.decode, structured=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
