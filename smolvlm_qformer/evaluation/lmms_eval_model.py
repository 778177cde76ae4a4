"""An lmms-eval model for a trained folder: `lmms-eval --model smolvlm_qformer --model_args pretrained=FOLDER`.

lmms-eval finds it through our package's `lmms_eval.models` entry point (`manifest`). Two classes, as lmms-eval's
own models come: `SmolVLMQFormer` is its chat model (the default: each task's `doc_to_messages`), and
`SmolVLMQFormerSimple` the simple one (`doc_to_visual` + the context string, chosen by `--force_simple`, which
multiple-choice tasks need: lmms-eval builds loglikelihood requests in simple mode only). Both generate in batches
through the package's one inference path (`inference.encode_prompts` / `generate_new_texts`) on the chat prompt of
the messages (`processor.apply_chat_template`), and score continuations (`loglikelihood`) on the same prompts.

Model arguments: `pretrained` (a folder or Hub id), `device` (default: CUDA if there is one), `batch_size`,
`system_prompt` (default: the chat template's), `max_new_tokens` (where a task sets none).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm import tqdm

from ..inference import encode_prompts, generate_new_texts, load_for_inference

logger = logging.getLogger(__name__)
MODEL_ID = "smolvlm_qformer"


def manifest() -> Any:
    """lmms-eval's registration of both classes (the `lmms_eval.models` entry point's payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id=MODEL_ID,
        chat_class_path=f"{__name__}.SmolVLMQFormer",
        simple_class_path=f"{__name__}.SmolVLMQFormerSimple",
    )


def stop_at(text: str, until: str | list[str] | None) -> str:
    """`text` cut before the first of the task's stop strings."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text


class SmolVLMQFormer(lmms):
    """lmms-eval's chat-mode model for a saved smolvlm-qformer folder."""

    is_simple = False
    gen_kwargs_index = 2  # where a generation request's arguments hold the task's generation kwargs

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        batch_size: int | str = 8,
        system_prompt: str | None = None,
        max_new_tokens: int | str = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = {name for name, value in kwargs.items() if value is not None and name != "max_batch_size"}
        if unknown:
            raise ValueError(f"unknown model_args for {MODEL_ID}: {', '.join(sorted(unknown))}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_for_inference(pretrained, device)
        self.batch_size = int(batch_size)
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None
        self.max_new_tokens = int(max_new_tokens)

    # -- what a request asks: (messages, images, generation kwargs); the simple model reads requests differently --

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _conversation(self, arguments: tuple) -> tuple[list[dict], list[Any], dict]:
        _, doc_to_messages, gen_kwargs, doc_id, task, split = arguments
        return (*self._chat_messages(doc_to_messages(self._doc(task, split, doc_id))), gen_kwargs)

    def _chat_messages(self, raw_messages: list[dict]) -> tuple[list[dict], list[Any]]:
        """lmms-eval's messages -> (chat-template messages, their images in order), with the system prompt."""
        messages = ChatMessages(messages=raw_messages)
        images, videos, audios = messages.extract_media()
        if videos or audios:
            raise ValueError(f"{MODEL_ID} sees images only, not video or audio")
        hf_messages = self._apply_system_prompt(messages.to_hf_messages(), self.system_prompt)
        return hf_messages, images

    def _round(self, arguments: tuple, round_idx: int, outputs: list[str], info: Any) -> tuple | None:
        """Round `round_idx` of a multi-round request: (new messages, images, info), or None when it is over."""
        _, doc_to_messages, _, doc_id, task, split = arguments
        doc = self._doc(task, split, doc_id)
        if round_idx == 0:
            return (*self._chat_messages(doc_to_messages(doc)), None)
        payload = doc_to_messages(doc, round_idx=round_idx, previous_output=list(outputs), previous_round_info=info)
        if not (isinstance(payload, tuple) and len(payload) == 4) or payload[1]:
            return None
        raw_messages, _, _, info = payload
        messages = ChatMessages(messages=raw_messages)
        return messages.to_hf_messages(), messages.extract_media()[0], info

    # -- lmms-eval's interface --

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in batches of `batch_size` requests with the same generation kwargs, cut at the task's `until`."""
        index = self.gen_kwargs_index
        collator = utils.Collator([r.args for r in requests], lambda a: -len(str(a[0])), lambda a: a[index], True)
        answers = []
        with tqdm(total=len(requests), desc=f"{MODEL_ID} generating") as progress:
            for chunk in collator.get_batched(n=self.batch_size):
                conversations = [self._conversation(arguments) for arguments in chunk]
                gen_kwargs = conversations[0][2]
                texts = self._generate([(messages, images) for messages, images, _ in conversations], gen_kwargs)
                answers += [stop_at(text, gen_kwargs.get("until")) for text in texts]
                progress.update(len(chunk))
        return collator.get_original(answers)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request as one conversation: every round's messages follow the earlier rounds and their answers."""
        results = []
        for request in tqdm(requests, desc=f"{MODEL_ID} multi-round"):
            gen_kwargs = request.args[self.gen_kwargs_index]
            conversation, images, outputs, info = [], [], [], None
            while (turn := self._round(request.args, len(outputs), outputs, info)) is not None:
                messages, new_images, info = turn
                if outputs:
                    conversation.append({"role": "assistant", "content": [{"type": "text", "text": outputs[-1]}]})
                conversation += messages
                images += new_images
                answer = self._generate([(conversation, images)], gen_kwargs)[0]
                outputs.append(stop_at(answer, gen_kwargs.get("until")))
            results.append(outputs)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(-log p(continuation | context and image), whether greedy decoding gives it) for (context, continuation,
        doc_to_visual, doc_id, task, split) requests, in batches: the context is a user turn after its images, the
        continuation the start of the answer.

        The negative log-likelihood (summed over the continuation's tokens), because lmms-eval's multiple-choice
        scoring picks the choice of least value (`np.argmin`: its own models return losses; lmms-eval issue #370).
        Each pair travels in a `GenerationResult`: lmms-eval 0.7.3's evaluator turns any other output that is not a
        string into its `str` (`unwrap_generation_output`), which multiple-choice scoring cannot unpack."""
        collator = utils.Collator([r.args for r in requests], lambda a: -len(a[0] + a[1]))
        scores = []
        with tqdm(total=len(requests), desc=f"{MODEL_ID} loglikelihood") as progress:
            for chunk in collator.get_batched(n=self.batch_size):
                scores += [GenerationResult(text=pair) for pair in self._loglikelihood(chunk)]
                progress.update(len(chunk))
        return collator.get_original(scores)

    # -- through the package's inference path --

    def _prompt(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _generate(self, conversations: list[tuple[list[dict], list[Any]]], gen_kwargs: dict) -> list[str]:
        """The answers to a batch of (messages, images); a batch that cannot run (an unreadable image, a prompt over
        the context) is retried one conversation at a time, and what still fails answers "" (logged)."""
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        do_sample = gen_kwargs.get("do_sample", True)
        temperature = float(gen_kwargs.get("temperature") or 0.0) if do_sample else 0.0
        prompts = [self._prompt(messages) for messages, _ in conversations]
        images = [image for _, conversation_images in conversations for image in conversation_images]
        try:
            inputs = encode_prompts(self.model, self.processor, prompts, images, max_new_tokens)
        except ValueError as error:
            if len(conversations) == 1:
                logger.warning("answering '' to a request that cannot run: %s", error)
                return [""]
            return [text for conversation in conversations for text in self._generate([conversation], gen_kwargs)]
        return generate_new_texts(self.model, self.processor, inputs, max_new_tokens, temperature)

    def _loglikelihood_request(self, arguments: tuple) -> tuple[str, str, list[Any]]:
        context, continuation, doc_to_visual, doc_id, task, split = arguments
        images = (doc_to_visual(self._doc(task, split, doc_id)) or []) if doc_to_visual else []
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": context}]
        messages = self._apply_system_prompt([{"role": "user", "content": content}], self.system_prompt)
        return self._prompt(messages), continuation, images

    @torch.no_grad()
    def _loglikelihood(self, chunk: list[tuple]) -> list[tuple[float, bool]]:
        prompts, continuations, images = zip(*map(self._loglikelihood_request, chunk), strict=True)
        texts = [prompt + continuation for prompt, continuation in zip(prompts, continuations, strict=True)]
        # prompt + continuation are tokenized together (as lm-eval-harness does); the continuation's tokens are what
        # the prompt's tokens are not
        lengths = [len(ids) for ids in self.processor.encode_text(list(prompts), padding=False)["input_ids"]]
        full_lengths = [len(ids) for ids in self.processor.encode_text(texts, padding=False)["input_ids"]]
        inputs = encode_prompts(self.model, self.processor, texts, [i for group in images for i in group], 0)
        # the continuation's tokens are the last ones of every row: only their logits are needed
        keep = max(full - length for length, full in zip(lengths, full_lengths, strict=True))
        logits = self.model(**inputs, logits_to_keep=keep + 1).logits[:, :-1].float()
        targets = inputs["input_ids"][:, -keep:]
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
        greedy = logits.argmax(-1) == targets
        scores = []
        for row, (length, full_length) in enumerate(zip(lengths, full_lengths, strict=True)):
            span = slice(keep - (full_length - length), None)
            scores.append((-logprobs[row, span].sum().item(), bool(greedy[row, span].all())))
        return scores


class SmolVLMQFormerSimple(SmolVLMQFormer):
    """lmms-eval's simple-mode model (`--force_simple`): requests carry a context string and `doc_to_visual`."""

    is_simple = True
    gen_kwargs_index = 1

    def _user_turn(self, visuals: list[Any] | None, text: str) -> list[dict]:
        content = [{"type": "image"} for _ in visuals or []] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    def _conversation(self, arguments: tuple) -> tuple[list[dict], list[Any], dict]:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = arguments
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        messages = self._apply_system_prompt(self._user_turn(visuals, context), self.system_prompt)
        return messages, visuals, gen_kwargs

    def _round(self, arguments: tuple, round_idx: int, outputs: list[str], info: Any) -> tuple | None:
        context, _, doc_to_visual, doc_to_text, doc_id, task, split = arguments
        doc = self._doc(task, split, doc_id)
        if round_idx == 0:
            visuals = doc_to_visual(doc) or []
            return self._apply_system_prompt(self._user_turn(visuals, context), self.system_prompt), visuals, None
        visuals, text, terminal, _, info = doc_to_text(
            doc, round_idx=round_idx, previous_output=list(outputs), previous_round_info=info
        )
        return None if terminal else (self._user_turn(visuals, text), visuals or [], info)
