"""The easy-VQA source: captions derived from the questions, the two configurations, and the `--dataset easy-vqa`
hook. The data ships in the `easy-vqa` package: nothing is downloaded."""

import random
import re
from collections import Counter

import datasets
import pytest
from PIL import Image

from smolvlm_qformer.data import DataArguments, load_image_text_dataset
from smolvlm_qformer.data.easy_vqa import (
    COLOURS,
    SHAPES,
    conversations_per_image,
    derive_colour_and_shape,
    easy_vqa_dataset,
    first_rows,
    is_negated,
    question_indices,
    sample_questions,
    sample_rows,
    says_present,
    stage2_data,
)

easy_vqa = pytest.importorskip("easy_vqa")

COLUMNS = ["image", "caption", "question", "answer"]
# (questions, images, images whose questions leave the colour or shape open) per split
COUNTS = {"train": (38575, 4000, 422), "test": (9673, 1000, 112)}


def test_attributes_stated_by_wh_answers_and_named_in_questions():
    pairs = [("what color is the circle?", "teal"), ("is there a red shape?", "no")]
    assert derive_colour_and_shape(pairs) == ("teal", "circle", ("stated", "stated"))
    assert derive_colour_and_shape([("what is the blue shape?", "rectangle")])[:2] == ("blue", "rectangle")


def test_yes_no_answers_flip_under_negation():
    pairs = [("is there not a gray shape?", "no"), ("does the image not contain a triangle?", "no")]
    assert derive_colour_and_shape(pairs)[:2] == ("gray", "triangle")


def test_says_present_reads_yes_no_answers_through_negations():
    assert says_present("is there a red shape?", "yes") is True
    assert says_present("Is there NOT a red shape?", "no") is True
    assert says_present("is no circle present?", "yes") is False
    assert says_present("does the image contain a triangle?", "no") is False
    assert says_present("what color is the shape?", "red") is None


def test_attribute_left_after_ruling_out_the_others():
    pairs = [(f"is there a {colour} shape?", "no") for colour in COLOURS[1:]] + [("is no circle present?", "no")]
    assert derive_colour_and_shape(pairs) == (COLOURS[0], "circle", ("eliminated", "stated"))


def test_open_attribute_is_none_and_contradiction_raises():
    assert derive_colour_and_shape([("what shape is present?", "circle")]) == (None, "circle", ("open", "stated"))
    with pytest.raises(ValueError, match="contradictory colour"):
        derive_colour_and_shape([("what color is the shape?", "red"), ("is there a red shape?", "no")])


@pytest.mark.parametrize("split", ["train", "test"])
def test_configurations_have_one_row_per_image_and_per_question(split):
    num_questions, num_images, uncaptioned = COUNTS[split]
    captions = easy_vqa_dataset(split, "captions")
    vqa = easy_vqa_dataset(split, "vqa")
    assert captions.column_names == vqa.column_names == COLUMNS
    assert len(captions) == num_images and len(set(captions["image"])) == num_images
    assert captions["caption"].count(None) == uncaptioned
    assert set(captions["question"]) == set(captions["answer"]) == {None}
    assert len(vqa) == num_questions + num_images - uncaptioned
    caption_rows = vqa.filter(lambda q: q is None, input_columns="question")
    assert caption_rows["answer"] == caption_rows["caption"] == [c for c in captions["caption"] if c]
    assert Counter(vqa["answer"]) - Counter(caption_rows["answer"]) == Counter(
        getattr(easy_vqa, f"get_{split}_questions")()[1]
    )
    with Image.open(captions["image"][0]) as image:
        assert image.size == (64, 64)


def test_captions_agree_with_every_colour_and_shape_answer():
    """Independent of the derivation's logic: every wh-question answer of a captioned image is in its caption."""
    rows = easy_vqa_dataset("test", "vqa").filter(lambda r: r["caption"] and r["question"])
    checked = 0
    for caption, answer in zip(rows["caption"], rows["answer"], strict=True):
        if answer in COLOURS + SHAPES:
            assert re.fullmatch(rf"a {answer} \w+|a \w+ {answer}", caption), (caption, answer)
            checked += 1
    assert checked > 2000


def test_selectable_as_a_dataset_source():
    captions = load_image_text_dataset(DataArguments(dataset="easy-vqa", dataset_config="captions"), "test")
    assert len(captions) == 888 and captions.empty_text_rows == 112
    assert captions[0]["caption"] == "a red triangle" and captions[0]["sample_index"] == 0
    vqa_args = DataArguments(
        dataset="easy-vqa",
        dataset_config="vqa",
        caption_column=None,
        question_column="question",
        answer_column="answer",
    )
    questions = load_image_text_dataset(vqa_args, "test")
    assert len(questions) == 9673 + 888 and questions.dataset.column_names == ["image", "question", "answer"]
    with pytest.raises(ValueError, match="splits"):
        easy_vqa_dataset("validation")


def _cells(questions, answers):
    pairs = zip(questions, answers, strict=True)
    return Counter((is_negated(q), a) if a in ("yes", "no") else "open" for q, a in pairs)


def test_the_wording_of_easy_vqa_yes_no_questions_gives_most_answers_away():
    """Why the demo reports (and can change) this share: in the data as it is, the wording answers 82% of them."""
    questions, answers, _ = easy_vqa.get_train_questions()
    cells = _cells(questions, answers)
    from_wording = cells[(False, "no")] + cells[(True, "yes")]
    assert from_wording / (from_wording + cells[(False, "yes")] + cells[(True, "no")]) > 0.8


@pytest.mark.parametrize("wording_share", [0.5, 0.65])
def test_questions_drawn_with_a_chosen_share_of_yes_no_answers_the_wording_gives_away(wording_share):
    questions, answers, _ = easy_vqa.get_train_questions()
    chosen = question_indices(questions, answers, 9001, random.Random(0), wording_share)
    assert len(chosen) == len(set(chosen)) == 9001 and chosen == sorted(chosen)
    cells = _cells([questions[i] for i in chosen], [answers[i] for i in chosen])
    yes_no_share = sum(a in ("yes", "no") for a in answers) / len(answers)  # kept: 74% of easy-VQA's questions
    assert cells["open"] == 9001 - round(9001 * yes_no_share)
    from_wording = cells[(False, "no")] + cells[(True, "yes")]
    from_image = cells[(False, "yes")] + cells[(True, "no")]
    assert from_wording / (from_wording + from_image) == pytest.approx(wording_share, abs=1e-3)
    for cells_alike in ((False, "no"), (True, "yes")), ((False, "yes"), (True, "no")):  # half plain, half negated
        assert abs(cells[cells_alike[0]] - cells[cells_alike[1]]) <= 1
    assert chosen == question_indices(questions, answers, 9001, random.Random(0), wording_share)
    assert chosen != question_indices(questions, answers, 9001, random.Random(1), wording_share)


def test_questions_drawn_per_image_keep_the_share_and_give_every_image_the_same_number():
    """Conversations of equal length (the demo's `--questions_per_image`) with the yes/no mix of independent draws."""
    questions, answers, image_ids = easy_vqa.get_train_questions()
    images = [str(i) for i in image_ids]
    chosen = question_indices(questions, answers, 9000, random.Random(0), 0.65, images, per_image=3)
    assert len(chosen) == len(set(chosen)) == 9000 and chosen == sorted(chosen)
    assert set(Counter(images[i] for i in chosen).values()) == {3}
    cells = _cells([questions[i] for i in chosen], [answers[i] for i in chosen])
    independent = _cells(
        *zip(
            *((questions[i], answers[i]) for i in question_indices(questions, answers, 9000, random.Random(0), 0.65)),
            strict=True,
        )
    )
    for cell, number in independent.items():  # the quotas of independent draws, met within 1%
        assert cells[cell] == pytest.approx(number, rel=0.01), cell
    assert chosen == question_indices(questions, answers, 9000, random.Random(0), 0.65, images, per_image=3)


def test_images_that_cannot_fill_a_conversation_within_the_quotas_are_passed_over():
    questions = ["is there a red shape?", "is there a blue shape?", "what color is the shape?"] * 2
    answers = ["no", "no", "red", "yes", "no", "blue"]
    images = ["a.png"] * 3 + ["b.png"] * 3
    # at wording share 1.0 the quotas hold one colour question and one plain "no" (no negated questions here): the
    # first image drawn takes both, and the other cannot fill a conversation of two
    for seed in range(5):
        chosen = question_indices(questions, answers, 4, random.Random(seed), 1.0, images, per_image=2)
        assert len(chosen) == 2 and len({images[i] for i in chosen}) == 1
    with pytest.raises(ValueError, match="each question's image"):
        question_indices(questions, answers, 4, random.Random(0), 1.0, per_image=2)


def test_questions_drawn_stop_short_when_a_cell_runs_out():
    questions = ["is there a red shape?"] * 3 + ["is there not a red shape?"] * 3 + ["what color is the shape?"]
    answers = ["yes", "no", "no", "yes", "yes", "no", "red"]
    chosen = question_indices(questions, answers, 14, random.Random(0), 0.5)
    assert _cells([questions[i] for i in chosen], [answers[i] for i in chosen]) == Counter(
        {(False, "yes"): 1, (False, "no"): 2, (True, "yes"): 2, (True, "no"): 1, "open": 1}
    )


def rows_about_five_images() -> datasets.Dataset:
    questions = [f"is there {'not ' * (i % 2)}a red shape?" if i % 3 else "what color is it?" for i in range(60)]
    answers = [["no", "yes"][i % 2] if i % 3 else "red" for i in range(60)]
    return datasets.Dataset.from_dict(
        {"image": [f"{i % 5}.png" for i in range(60)], "question": questions, "answer": answers}
    )


def test_sample_rows_draws_in_order_and_first_rows_takes_the_head():
    rows = datasets.Dataset.from_dict({"n": list(range(20))})
    drawn = sample_rows(rows, 5, seed=0)["n"]
    assert len(set(drawn)) == 5 and drawn == sorted(drawn) and drawn == sample_rows(rows, 5, seed=0)["n"]
    assert sample_rows(rows, None, seed=0)["n"] == sample_rows(rows, 99, seed=0)["n"] == list(range(20))
    assert first_rows(rows, 3)["n"] == [0, 1, 2] and len(first_rows(rows, None)) == 20


def test_sample_questions_is_question_indices_on_rows():
    rows = rows_about_five_images()
    sampled = sample_questions(rows, 9, seed=0, wording_share=0.5, per_image=3)
    chosen = question_indices(rows["question"], rows["answer"], 9, random.Random(0), 0.5, rows["image"], 3)
    assert sampled["question"] == rows.select(chosen)["question"]
    assert set(Counter(sampled["image"]).values()) == {3}
    independent = sample_questions(rows, 9, seed=0, wording_share=0.5)
    assert (
        independent["question"]
        == rows.select(question_indices(rows["question"], rows["answer"], 9, random.Random(0), 0.5))["question"]
    )
    assert len(sample_questions(rows, None, seed=0, wording_share=None)) == 60  # all of them
    with pytest.raises(ValueError, match="wording share"):  # a drawn count needs the yes/no mix chosen
        sample_questions(rows, 9, seed=0, wording_share=None)


def test_conversation_mode_groups_each_images_caption_and_questions():
    rows = datasets.Dataset.from_dict(
        {
            "image": ["a.png", "b.png", "a.png", "a.png"],
            "question": ["Colour?", "Shape?", None, "Is it red?"],
            "answer": ["red", "circle", "a red square", "yes"],
        }
    )
    grouped = conversations_per_image(rows)
    assert grouped["image"] == ["a.png", "b.png"]
    first = grouped[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] * 3
    assert [p["type"] for p in first[0]["content"]] == ["image"]  # the caption turn: its instruction is drawn later
    assert first[1]["content"][0]["text"] == "a red square"
    assert [m["content"][-1]["text"] for m in first[2::2]] == ["Colour?", "Is it red?"]
    assert sum(p["type"] == "image" for m in first for p in m["content"]) == 1


def test_stage2_data_draws_captions_of_the_images_asked_about():
    rows = rows_about_five_images()
    captions = datasets.Dataset.from_dict(
        {"image": [f"{i}.png" for i in range(5)], "question": [None] * 5, "answer": [f"caption {i}" for i in range(5)]}
    )
    rows = datasets.concatenate_datasets([rows, captions])
    data = stage2_data(rows, 6, 5, seed=0, wording_share=0.5, per_image=3, conversations=True)
    asked = data.num_questions // 3
    assert data.num_questions == 3 * asked > 0 and data.majority_answer == "red"  # the first of the commonest
    assert data.num_captions == len(data.train) == asked  # one conversation per image asked about, each captioned
    assert all(len(messages) == 2 * 4 for messages in data.train["messages"])  # its caption, then 3 questions
    flat = stage2_data(rows, 6, 1, seed=0, wording_share=0.5)
    assert flat.num_captions == 1 and len(flat.train) == flat.num_questions + 1
