"""transformers' own common model tests, run on our model.

`ModelTesterMixin`, `ConfigTester` and `PipelineTesterMixin` come from the installed transformers release's test
files, which `.ci/fetch_transformers_tests.py` unpacks from its sdist into `.transformers-tests/` (git-ignored;
set SMOLVLM_TRANSFORMERS_TESTS to use another folder). Without them this module is skipped.

The sdist lacks some files those tests import; the fetch script stubs them (see its docstring), and the checks they
would hold are ours, below: `GenerationChecks` for `tests/generation/test_utils.py` (GenerationTesterMixin),
`ExportChecks` for `tests/exporters/test_export.py` (ExportTesterMixin), and `ImageTextToTextPipelineChecks` for
`tests/pipelines/test_pipelines_image_text_to_text.py`, the task test that `PipelineTesterMixin` runs.

The tiny model: batch 12 (as transformers' BLIP-2 testers), 4 image placeholders + 7 text tokens, 2-layer ViT,
Q-Former and Llama LM of width 32 (`smolvlm_qformer.testing_utils.tiny_config`).

Skips: only tests that transformers' own BLIP-2 (`Blip2ForConditionalGenerationDecoderOnlyTest`) or LLaVA
(`LlavaForConditionalGenerationModelTest`) test classes skip too (or, for the placeholder past the vocabulary,
InternVL-Flash's), each with their reason.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import types
import unittest
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_MAPPING_NAMES

from smolvlm_qformer import SmolVLMQFormerConfig, SmolVLMQFormerForConditionalGeneration, SmolVLMQFormerModel
from smolvlm_qformer.testing_utils import draw_shape, tiny_config, tiny_processor

TRANSFORMERS_VERSION = importlib.metadata.version("transformers")
FETCHED = (
    Path(os.environ.get("SMOLVLM_TRANSFORMERS_TESTS", Path(__file__).resolve().parent.parent / ".transformers-tests"))
    / f"transformers-{TRANSFORMERS_VERSION}"
)
if not (FETCHED / "FETCHED.json").is_file():
    pytest.skip(
        f"transformers {TRANSFORMERS_VERSION}'s own test files are not in {FETCHED} "
        "(run `python .ci/fetch_transformers_tests.py`)",
        allow_module_level=True,
    )
pytest.importorskip(
    "parameterized", reason="transformers' test files need `parameterized` (the fetch script installs it)"
)
STUBS = json.loads((FETCHED / "FETCHED.json").read_text())["stubs"]

# The fetched folder is the package `tests`, as in a transformers checkout (its files import each other relatively).
_loaded = sys.modules.get("tests")
if _loaded is not None and Path(getattr(_loaded, "__file__", None) or "/").parent != FETCHED / "tests":
    raise ImportError(f"a module named `tests` is already imported ({_loaded!r}): cannot import {FETCHED / 'tests'}")
sys.path.insert(0, str(FETCHED))

# PipelineTesterMixin loads its models from the Hub (hf-internal-testing) unless TRANSFORMERS_TINY_MODEL_PATH names
# a local folder, read once at import: ours, where `save_tiny_models` writes our tiny model and its summary.
TINY_MODELS = Path(tempfile.mkdtemp(prefix="smolvlm-tiny-models-"))
atexit.register(shutil.rmtree, TINY_MODELS, ignore_errors=True)
_previous = os.environ.get("TRANSFORMERS_TINY_MODEL_PATH")
os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(TINY_MODELS)
(TINY_MODELS / "reports").mkdir()
PROCESSOR = tiny_processor()
(TINY_MODELS / "reports" / "tiny_model_summary.json").write_text(
    json.dumps(
        {
            SmolVLMQFormerForConditionalGeneration.__name__: {
                "tokenizer_classes": [type(PROCESSOR.tokenizer).__name__],
                "processor_classes": [type(PROCESSOR.image_processor).__name__],
            }
        }
    )
)


class ImageTextToTextPipelineChecks:
    """Stands in for transformers' `tests/pipelines/test_pipelines_image_text_to_text.py` (not in the sdist):
    PipelineTesterMixin loads the model and its tokenizer / image processor from our tiny-model folder and hands
    them to `get_test_pipeline`, then calls `run_pipeline_test` and a batched run of the examples."""

    def get_test_pipeline(self, model, tokenizer=None, image_processor=None, dtype="float32", **_):
        from transformers import pipeline

        from smolvlm_qformer import SmolVLMQFormerProcessor

        processor = SmolVLMQFormerProcessor(
            image_processor, tokenizer, PROCESSOR.qformer_tokenizer, num_query_tokens=model.config.num_query_tokens
        )
        pipe = pipeline("image-text-to-text", model=model, processor=processor, dtype=dtype, max_new_tokens=4)
        pipe.model.generation_config.eos_token_id = None
        images = [draw_shape(c, s, size=32, seed=i) for i, (c, s) in enumerate([("red", "circle"), ("blue", "square")])]
        examples = [
            {"images": images[0], "text": "<image>Describe the image."},
            {"images": images[1], "text": "What shape is it?"},
        ]
        return pipe, examples

    def run_pipeline_test(self, pipe, examples):
        for example in examples:
            outputs = pipe(**example)
            self.assertEqual(len(outputs), 1)
            self.assertIsInstance(outputs[0]["generated_text"], str)
        # return_full_text=False: only the new text
        outputs = pipe(**examples[0], return_full_text=False)
        self.assertIsInstance(outputs[0]["generated_text"], str)
        # a batch of prompts with their images, in one processor call: all with markers, or all plain questions
        images = [example["images"] for example in examples]
        for texts in (["<image>Describe the image.", "<image>What shape is it?"], ["Describe it.", "What shape?"]):
            outputs = pipe(images=images, text=texts, batch_size=2)
            self.assertEqual(len(outputs), len(examples))


def chat_messages(image) -> list[dict]:
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]
    return [{"role": "user", "content": content}]


class _Unittest(unittest.TestCase):  # the assert methods, for the pipeline checks instance; not collected
    __test__ = False

    def runTest(self):
        pass


class _ImageTextToTextPipelineTests(ImageTextToTextPipelineChecks, _Unittest):
    pass


def _install_task_test() -> None:
    """PipelineTesterMixin imports its task tests from `tests.pipelines` (lazily in 5.24, at import before): ours
    for image-text-to-text, put in place before the mixin is imported."""
    try:  # the sdist has no tests/pipelines/; the fetch script stubs it where the mixin imports it at import time
        pipelines = importlib.import_module("tests.pipelines")
    except ModuleNotFoundError:
        pipelines = types.ModuleType("tests.pipelines")
        pipelines.__path__ = []
        sys.modules["tests.pipelines"] = pipelines
    task_module = types.ModuleType("tests.pipelines.test_pipelines_image_text_to_text")
    task_module.ImageTextToTextPipelineTests = _ImageTextToTextPipelineTests
    sys.modules[task_module.__name__] = task_module
    pipelines.test_pipelines_image_text_to_text = task_module


_install_task_test()


# test_configuration_common / test_pipeline_mixin re-execute a transformers `__init__` (direct_transformers_import),
# which puts a second module object in sys.modules["transformers"]: put the original back for the rest of the session.
_transformers_module = sys.modules["transformers"]
try:
    with warnings.catch_warnings():  # their marks (flash_attn_test, ...) are registered by transformers' conftest
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        from tests.generation.test_utils import GenerationTesterMixin  # noqa: E402
        from tests.test_configuration_common import ConfigTester  # noqa: E402
        from tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor  # noqa: E402
        from tests.test_pipeline_mixin import PipelineTesterMixin  # noqa: E402
finally:
    sys.modules["transformers"] = _transformers_module
    if _previous is None:
        del os.environ["TRANSFORMERS_TINY_MODEL_PATH"]
    else:
        os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = _previous

if "generation/test_utils.py" not in STUBS:  # a release whose sdist ships it: run it instead of our checks
    raise ImportError("tests/generation/test_utils.py is real here: inherit its GenerationTesterMixin's tests")

# What transformers' auto mappings would list for our model type, were it in transformers (remote code is not):
# ModelTesterMixin picks base models, heads and their labels by these names, so each test registers them for its
# duration (`SmolVLMQFormerModelTest.setUp`).
MAPPING_NAMES = (
    (MODEL_MAPPING_NAMES, SmolVLMQFormerModel),
    (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, SmolVLMQFormerForConditionalGeneration),
)


PLACEHOLDER_OUTSIDE_EMBEDDINGS = (
    "by design the image placeholder id lies past the LM's vocabulary (the LM keeps its embedding shape): its input "
    "embedding is token 0's until the image replaces it, so in inputs_embeds alone a placeholder cannot be told "
    "from token 0, and images need input_ids to find their placeholders (tests/test_generation.py checks "
    "inputs_embeds without images, and the clear error with them)"
)


class SmolVLMQFormerModelTester:
    """Tiny configs and inputs for the common tests, attributes named as ModelTesterMixin reads them."""

    def __init__(self, parent, batch_size: int = 12, text_seq_length: int = 7, is_training: bool = True):
        self.parent = parent
        self.processor = PROCESSOR
        config = self.get_config()
        self.batch_size = batch_size
        self.is_training = is_training
        self.num_query_tokens = config.num_query_tokens
        self.image_token_id = config.image_token_id
        self.text_seq_length = text_seq_length
        self.seq_length = self.encoder_seq_length = text_seq_length + self.num_query_tokens
        self.vision_config = config.vision_config.to_dict()
        self.text_config = config.text_config.to_dict()
        self.vocab_size = config.text_config.vocab_size
        self.hidden_size = config.text_config.hidden_size
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.num_attention_heads = config.text_config.num_attention_heads
        self.image_size = config.vision_config.image_size
        self.patch_size = config.vision_config.patch_size
        self.num_channels = config.vision_config.num_channels

    def get_config(self) -> SmolVLMQFormerConfig:
        config = tiny_config(self.processor)
        # transformers' testers' initialisation (BLIP-2's and LLaVA's: 0.02), not tiny_config's wide one (LM 0.5,
        # Q-Former 0.2, for the package's learning tests): with it, numerical noise alone (a stock Llama, eager vs
        # SDPA) exceeds the fp32 tolerances of test_eager_matches_sdpa_inference
        for sub_config in (config.vision_config, config.qformer_config, config.text_config):
            sub_config.initializer_range = 0.02
        return config

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        # text ids clear of the special tokens (0-2); the image placeholders first, as BLIP-2's and LLaVA's testers
        text_ids = ids_tensor([self.batch_size, self.text_seq_length], self.vocab_size - 3) + 3
        image_ids = torch.full((self.batch_size, self.num_query_tokens), self.image_token_id, dtype=torch.long)
        input_ids = torch.cat([image_ids.to(text_ids.device), text_ids], dim=1)
        attention_mask = torch.ones_like(input_ids)
        return config, input_ids, attention_mask, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


# --------------------------------------------------------------------------------------------------------------
# Our checks for what the files missing from the sdist test
# --------------------------------------------------------------------------------------------------------------


class GenerationChecks:
    """What transformers' GenerationTesterMixin (not in the sdist) checks, for a VLM: greedy search with and without
    the KV cache, dict outputs, `inputs_embeds`, the image at prefill only, left padding, batched = one by one."""

    max_new_tokens = 5

    def _generation_model(self, model_class):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = model_class(config).eval()
        # never stop early: every run yields max_new_tokens, so sequences compare position by position
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model, inputs

    def _greedy(self, model, **kwargs):
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        return model.generate(do_sample=False, **kwargs)

    def _text_only(self, inputs):
        input_ids = inputs["input_ids"][:, self.model_tester.num_query_tokens :]
        return input_ids, torch.ones_like(input_ids)

    def test_greedy_generate_cache_matches_no_cache(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            with_cache = self._greedy(model, **inputs, use_cache=True)
            without_cache = self._greedy(model, **inputs, use_cache=False)
            expected_shape = (self.model_tester.batch_size, self.model_tester.seq_length + self.max_new_tokens)
            self.assertEqual(with_cache.shape, expected_shape)
            torch.testing.assert_close(with_cache, without_cache, rtol=0, atol=0)

    def test_greedy_generate_dict_outputs(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            out = self._greedy(model, **inputs, return_dict_in_generate=True, output_scores=True, output_logits=True)
            self.assertEqual(len(out.scores), self.max_new_tokens)
            self.assertEqual(len(out.logits), self.max_new_tokens)
            self.assertEqual(out.scores[0].shape, (self.model_tester.batch_size, self.model_tester.vocab_size))
            chosen = torch.stack([score.argmax(-1) for score in out.scores], dim=1)  # greedy: the argmax is chosen
            torch.testing.assert_close(out.sequences[:, -self.max_new_tokens :], chosen, rtol=0, atol=0)

    def test_image_goes_in_at_prefill_only(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            calls = []
            original = model.forward

            @functools.wraps(original)  # generate checks its kwargs against forward's signature
            def recording_forward(*args, _calls=calls, _original=original, **kwargs):
                image = kwargs.get("pixel_values") is not None or kwargs.get("vision_hidden_states") is not None
                _calls.append((kwargs["input_ids"].shape[1], image))
                return _original(*args, **kwargs)

            model.forward = recording_forward
            self._greedy(model, **inputs, use_cache=True)
            self.assertEqual(len(calls), self.max_new_tokens)
            self.assertEqual(calls[0], (self.model_tester.seq_length, True))
            self.assertTrue(all(call == (1, False) for call in calls[1:]), calls)

    def test_generate_depends_on_the_image(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            first = self._greedy(model, **inputs, return_dict_in_generate=True, output_logits=True).logits[0]
            other = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
            second = self._greedy(model, **other, return_dict_in_generate=True, output_logits=True).logits[0]
            self.assertFalse(torch.allclose(first, second))

    def test_generate_text_only_from_inputs_embeds(self):
        """A text-only prompt as `inputs_embeds`: the new tokens that `input_ids` give."""
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            input_ids, mask = self._text_only(inputs)
            from_ids = self._greedy(model, input_ids=input_ids, attention_mask=mask)
            embeds = model.get_input_embeddings()(input_ids)
            from_embeds = self._greedy(model, inputs_embeds=embeds, attention_mask=mask)
            torch.testing.assert_close(from_embeds, from_ids[:, input_ids.shape[1] :], rtol=0, atol=0)

    def test_generate_from_input_ids_and_inputs_embeds(self):
        """`input_ids` beside `inputs_embeds`: the embeddings are used and the output starts with the prompt."""
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            input_ids, mask = self._text_only(inputs)
            from_ids = self._greedy(model, input_ids=input_ids, attention_mask=mask)
            embeds = model.get_input_embeddings()(input_ids)
            both = self._greedy(model, input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask)
            torch.testing.assert_close(both, from_ids, rtol=0, atol=0)

    def test_generate_with_image_from_inputs_embeds(self):
        """The prompt's embeddings with the image features spliced in, as `inputs_embeds`: the same new tokens as
        `input_ids` + `pixel_values`; and `pixel_values` beside `inputs_embeds` alone are refused, not dropped."""
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            from_ids = self._greedy(model, **inputs)[:, self.model_tester.seq_length :]
            input_ids = inputs["input_ids"]
            with torch.no_grad():
                features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            placeholders = (input_ids == self.model_tester.image_token_id).unsqueeze(-1)
            text_embeds = model.get_input_embeddings()(input_ids.masked_fill(placeholders[..., 0], 0))
            embeds = text_embeds.masked_scatter(placeholders, features)
            from_embeds = self._greedy(model, inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
            torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=0)
            with self.assertRaises(ValueError), torch.no_grad():
                model(inputs_embeds=text_embeds, pixel_values=inputs["pixel_values"])

    def test_left_padding_matches_unpadded(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            unpadded = self._greedy(model, **inputs, return_dict_in_generate=True, output_logits=True)
            pad = torch.zeros((self.model_tester.batch_size, 3), dtype=torch.long)
            padded_inputs = dict(
                inputs,
                input_ids=torch.cat([pad, inputs["input_ids"]], dim=1),
                attention_mask=torch.cat([pad, inputs["attention_mask"]], dim=1),
            )
            padded = self._greedy(model, **padded_inputs, return_dict_in_generate=True, output_logits=True)
            torch.testing.assert_close(padded.logits[0], unpadded.logits[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(padded.sequences[:, 3:], unpadded.sequences, rtol=0, atol=0)

    def test_batched_generate_matches_one_by_one(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generation_model(model_class)
            batched = self._greedy(model, **inputs)
            for row in (0, self.model_tester.batch_size - 1):
                single = self._greedy(model, **{k: v[row : row + 1] for k, v in inputs.items()})
                torch.testing.assert_close(single[0], batched[row], rtol=0, atol=0)


class ExportChecks:
    """What transformers' ExportTesterMixin (not in the sdist) checks: `torch.export` of the forward pass runs and
    gives the eager outputs; here for the prefill (image + prompt) and for a text-only step."""

    def _export_and_compare(self, model, kwargs):
        with torch.no_grad():
            eager = model(**kwargs)[0]
            program = torch.export.export(model, args=(), kwargs=kwargs, strict=False)
            exported = program.module()(**kwargs)[0]
        torch.testing.assert_close(exported, eager)

    def test_torch_export_prefill(self):
        for model_class in self.all_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = model_class(config).eval()
            self._export_and_compare(model, dict(inputs, use_cache=False))

    def test_torch_export_text_only(self):
        for model_class in self.all_model_classes:
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = model_class(config).eval()
            text = inputs["input_ids"][:, self.model_tester.num_query_tokens :]
            self._export_and_compare(
                model, {"input_ids": text, "attention_mask": torch.ones_like(text), "use_cache": False}
            )


def save_tiny_models(model_tester) -> None:
    """Our tiny model, tokenizer and image processor where PipelineTesterMixin looks for them (once)."""
    for model_class in PIPELINE_MODEL_CLASSES:
        folder = TINY_MODELS / model_class.config_class.model_type / model_class.__name__
        if not folder.exists():
            torch.manual_seed(0)
            model_class(model_tester.get_config()).save_pretrained(folder)
            PROCESSOR.save_pretrained(folder)


PIPELINE_MODEL_CLASSES = (SmolVLMQFormerForConditionalGeneration,)


# --------------------------------------------------------------------------------------------------------------
# The test class
# --------------------------------------------------------------------------------------------------------------


class SmolVLMQFormerModelTest(
    ModelTesterMixin, GenerationTesterMixin, GenerationChecks, ExportChecks, PipelineTesterMixin, unittest.TestCase
):
    """transformers' common tests as its LLaVA / BLIP-2 test classes configure them, on both our classes."""

    all_model_classes = (SmolVLMQFormerModel, SmolVLMQFormerForConditionalGeneration)
    pipeline_model_mapping = {"image-text-to-text": SmolVLMQFormerForConditionalGeneration}
    # the inputs beside the main one (`input_ids`) that the tests building their own inputs pass: the images
    additional_model_inputs = [
        name for name in ("input_ids", "pixel_values") if name != SmolVLMQFormerForConditionalGeneration.main_input_name
    ]
    _is_composite = True
    # As Blip2ForConditionalGenerationDecoderOnlyTest (test_resize_embeddings = False). Here the mixin's resize tests
    # clamp input_ids into a shrunk vocabulary, which turns the image placeholders (past the vocabulary) into text
    # while pixel_values are still given: "the prompt has 0 image placeholder tokens but the images give 12 x 4".
    test_resize_embeddings = False

    def setUp(self):
        for mapping, model_class in MAPPING_NAMES:
            patcher = mock.patch.dict(mapping, {SmolVLMQFormerConfig.model_type: model_class.__name__})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = SmolVLMQFormerModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=SmolVLMQFormerConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "num_query_tokens"],
        )

    def run_task_tests(self, task, dtype="float32"):
        save_tiny_models(self.model_tester)
        super().run_task_tests(task, dtype=dtype)

    def test_fetched_stubs(self):
        """The sdist lacks the generation tests (our GenerationChecks stand in): if a release ships them, run
        those instead."""
        self.assertIn("generation/test_utils.py", STUBS)

    def test_labels_may_be_input_ids(self):
        """`labels=input_ids` (as transformers' VLM tests pass them): the placeholders carry no label."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = SmolVLMQFormerForConditionalGeneration(config).eval()
        loss = model(**inputs, labels=inputs["input_ids"].clone()).loss
        self.assertTrue(torch.isfinite(loss))

    def test_pipeline_chat_messages(self):
        """The image-text-to-text pipeline with chat messages holding the image (apply_chat_template's path)."""
        save_tiny_models(self.model_tester)
        task_test = _ImageTextToTextPipelineTests()
        model = SmolVLMQFormerForConditionalGeneration.from_pretrained(
            TINY_MODELS / SmolVLMQFormerConfig.model_type / SmolVLMQFormerForConditionalGeneration.__name__
        ).eval()
        pipe, examples = task_test.get_test_pipeline(model, PROCESSOR.tokenizer, PROCESSOR.image_processor)
        outputs = pipe(text=chat_messages(examples[0]["images"]))
        self.assertIsInstance(outputs[0]["generated_text"], list)
        self.assertEqual(outputs[0]["generated_text"][-1]["role"], "assistant")

    # --- transformers' common tests, a few run without subtests or skipped with the reason ---

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_causal_lm_loss_honors_shift_labels(self):
        self._without_subtests(super().test_causal_lm_loss_honors_shift_labels)

    def test_get_image_features_attentions(self):
        super().test_get_image_features_attentions()

    def test_get_image_features_hidden_states(self):
        super().test_get_image_features_hidden_states()

    @unittest.skip(reason=PLACEHOLDER_OUTSIDE_EMBEDDINGS + " (BLIP-2's test class skips test_inputs_embeds)")
    def test_inputs_embeds(self):
        super().test_inputs_embeds()

    @unittest.skip(reason=PLACEHOLDER_OUTSIDE_EMBEDDINGS + " (as InternVL-Flash's test class skips it)")
    def test_inputs_embeds_matches_input_ids(self):
        super().test_inputs_embeds_matches_input_ids()

    def test_multimodal_outputs_are_returned(self):
        super().test_multimodal_outputs_are_returned()

    def test_tied_weights_are_sharded_together(self):
        super().test_tied_weights_are_sharded_together()

    def _without_subtests(self, test) -> None:
        """Runs a mixin test with `subTest` a no-op: pytest reports a failing subtest on its own and the test as
        passed, which a strict xfail would turn into XPASS; this way the first failure fails the test."""
        with mock.patch.object(self, "subTest", lambda *args, **kwargs: contextlib.nullcontext()):
            test()

    def test_training_gradient_checkpointing(self):
        self._without_subtests(super().test_training_gradient_checkpointing)

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        self._without_subtests(super().test_training_gradient_checkpointing_use_reentrant_false)

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        self._without_subtests(super().test_training_gradient_checkpointing_use_reentrant_true)
