"""easy-VQA as an image-text source: the `easy-vqa` PyPI package (MIT) holds 64x64 PNGs of one coloured shape each
(4,000 train / 1,000 test) and generated questions about them (38,575 / 9,673, 13 answers).

The package has no captions; each image's "a {colour} {shape}" caption is derived from its own question-answer pairs
(`derive_colour_and_shape`). About 10% of the images (422 train, 112 test) get questions that leave the colour or
the shape open: they have no caption (an empty caption, which the loader drops and counts) but keep their questions.
Two configurations, in the canonical columns image (a file path), caption, question and answer:

- `captions`: one row per image, question and answer empty (stage 1).
- `vqa`: per image, a caption row if it has a caption (no question; the answer is the caption, so stage 2 trains it
  behind a captioning instruction), then one row per question (stage 2).
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import datasets

logger = logging.getLogger(__name__)

COLOURS = ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
NEGATIONS = frozenset({"not", "no"})
CONFIGS = ("captions", "vqa")
SPLITS = ("train", "test")
FEATURES = datasets.Features({name: datasets.Value("string") for name in ("image", "caption", "question", "answer")})


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def is_negated(question: str) -> bool:
    """Whether a yes/no question asks about absence ("is there not a red shape?", "is no circle present?")."""
    return bool(set(re.findall(r"[a-z]+", question.lower())) & NEGATIONS)


def wording_answer(question: str) -> str:
    """The yes/no answer a question's wording suggests without the image: "no" to a plain one, "yes" to a negated one
    (most name a colour or shape the image lacks; right for 82% of easy-VQA's yes/no questions)."""
    return "yes" if is_negated(question) else "no"


def says_present(question: str, answer: str) -> bool | None:
    """For a yes/no question, whether its answer says the colour or shape the question names is in the image (a
    negation flips the answer: "is there not a red shape?" "no" -> present); None for colour and shape questions."""
    if answer not in YES_NO:
        return None
    return (answer == "yes") != is_negated(question)


def _resolve(kind: str, values: tuple[str, ...], stated: set[str], ruled_out: set[str]) -> tuple[str | None, str]:
    """One attribute from what the answers state and what the yes/no answers rule out: (value, how it was found:
    "stated" / "eliminated"), or (None, "open") when several values remain."""
    if len(stated) > 1 or stated & ruled_out:
        raise ValueError(f"contradictory {kind}: stated {sorted(stated)}, ruled out {sorted(ruled_out)}")
    if stated:
        return next(iter(stated)), "stated"
    remaining = set(values) - ruled_out
    return (remaining.pop(), "eliminated") if len(remaining) == 1 else (None, "open")


def derive_colour_and_shape(qa_pairs: Iterable[tuple[str, str]]) -> tuple[str | None, str | None, tuple[str, str]]:
    """(colour, shape, how each was found) of one image from its question-answer pairs; None where they leave it open.

    A colour / shape answer states that attribute (and a colour or shape the question names: "what color is the
    circle?" -> circle). A yes/no question names one colour or shape; the answer, flipped by a negation ("is there
    not a red shape?"), states it or rules it out. What no answer states is the one value left after ruling out the
    rest. Raises `ValueError` when the pairs contradict each other (an ambiguous image).
    """
    vocabularies = {"colour": COLOURS, "shape": SHAPES}
    stated: dict[str, set[str]] = defaultdict(set)
    ruled_out: dict[str, set[str]] = defaultdict(set)
    for question, answer in qa_pairs:
        words = set(re.findall(r"[a-z]+", question.lower()))
        holds = says_present(question, answer)
        if holds is not None:
            for kind, values in vocabularies.items():
                (stated if holds else ruled_out)[kind].update(words.intersection(values))
        else:
            for kind, values in vocabularies.items():
                stated[kind].update(words.intersection(values) | ({answer} & set(values)))
    (colour, colour_source), (shape, shape_source) = (
        _resolve(kind, values, stated[kind], ruled_out[kind]) for kind, values in vocabularies.items()
    )
    return colour, shape, (colour_source, shape_source)


Cell = tuple[bool, bool] | None  # a question's (negated, answers as worded); None for colour and shape questions


def question_indices(
    questions: Sequence[str],
    answers: Sequence[str],
    count: int,
    rng: random.Random,
    wording_share: float,
    images: Sequence[str] | None = None,
    per_image: int | None = None,
) -> list[int]:
    """`count` question indices drawn so that `wording_share` of the yes/no ones answer as their wording suggests.

    easy-VQA's yes/no questions mostly name a colour or shape the image lacks, so 82% of plain questions ("is there
    a red shape?") answer "no" and 82% of negated ones ("is there not a red shape?") "yes": a model that ignores the
    image scores 82% on them (about 87% of all questions), and that is where stage 2 stalls when it does. This draws
    the yes/no questions from the four (negated, answer) cells: `wording_share` of them, half plain, half negated,
    from the two cells the wording predicts (plain "no", negated "yes"), the rest from the two only the image answers;
    0.5 hides the answer from the wording entirely (the language-prior balancing of VQA v2). The share of yes/no vs
    colour / shape questions stays the data's. Sorted; fewer than `count` if a cell runs out.

    With `images` (each question's image) and `per_image`: `per_image` questions about each of `count // per_image`
    images drawn at random (conversations of equal length), each question from the cell furthest below its quota
    among those the image offers; an image that cannot give `per_image` is passed over.
    """
    cells: dict[Cell, list[int]] = defaultdict(list)
    for index, (question, answer) in enumerate(zip(questions, answers, strict=True)):
        cells[_cell(question, answer)].append(index)
    quotas = _quotas({cell: len(indices) for cell, indices in cells.items()}, count, wording_share)
    if per_image is None:
        chosen = [i for cell, quota in quotas.items() for i in rng.sample(cells[cell], min(quota, len(cells[cell])))]
        return sorted(chosen)
    if images is None:
        raise ValueError("question_indices: per_image needs each question's image")
    return sorted(_per_image_indices(cells, quotas, images, per_image, count // per_image, rng))


def _cell(question: str, answer: str) -> Cell:
    return (is_negated(question), answer == wording_answer(question)) if answer in YES_NO else None


def _quotas(sizes: dict[Cell, int], count: int, wording_share: float) -> dict[Cell, int]:
    """How many of `count` questions each cell gives: yes/no in the data's share, `wording_share` of them as worded,
    each half plain, half negated."""
    total = sum(sizes.values())
    yes_no = round(count * (total - sizes.get(None, 0)) / max(total, 1))
    from_wording = round(yes_no * wording_share)
    from_image = yes_no - from_wording
    return {
        None: count - yes_no,
        (False, True): from_wording // 2,
        (True, True): from_wording - from_wording // 2,
        (False, False): from_image // 2,
        (True, False): from_image - from_image // 2,
    }


def _per_image_indices(
    cells: dict[Cell, list[int]],
    quotas: dict[Cell, int],
    images: Sequence[str],
    per_image: int,
    num_images: int,
    rng: random.Random,
) -> list[int]:
    """`per_image` indices from each of `num_images` images taken in a random order, each from the cell of that image
    furthest below its quota (the greedy fill keeps the cells' shares close to their quotas)."""
    by_image: dict[str, dict[Cell, list[int]]] = defaultdict(lambda: defaultdict(list))
    for cell, indices in cells.items():
        for index in indices:
            by_image[images[index]][cell].append(index)
    left = dict(quotas)
    order = sorted(by_image)
    rng.shuffle(order)
    chosen: list[int] = []
    for image in order:
        if len(chosen) >= num_images * per_image:
            break
        offered = {cell: rng.sample(indices, len(indices)) for cell, indices in by_image[image].items()}
        picked: list[tuple[Cell, int]] = []
        for _ in range(per_image):
            open_cells = [cell for cell, indices in offered.items() if indices and left.get(cell, 0) > 0]
            if not open_cells:
                break
            cell = max(open_cells, key=lambda c: left[c] / quotas[c])
            picked.append((cell, offered[cell].pop()))
            left[cell] -= 1
        if len(picked) < per_image:  # give the quota back: this image cannot fill a conversation
            for cell, _ in picked:
                left[cell] += 1
            continue
        chosen.extend(index for _, index in picked)
    return chosen


def easy_vqa_dataset(split: str = "train", config: str | None = None) -> datasets.Dataset:
    """One split of easy-VQA in the canonical columns (see the module docstring); `config` is "captions" (default)
    or "vqa". Rows are ordered by image id, each image's questions in the package's order."""
    import easy_vqa

    config = config or "captions"
    if split not in SPLITS or config not in CONFIGS:
        raise ValueError(f"easy-VQA has splits {SPLITS} and configs {CONFIGS}, got {split!r} / {config!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    unknown = set(answers) - set(COLOURS + SHAPES + YES_NO)
    if unknown:
        raise ValueError(f"easy-VQA answers outside the known vocabulary: {sorted(unknown)}")

    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for question, answer, image_id in zip(questions, answers, image_ids, strict=True):
        per_image[image_id].append((question, answer))
    missing = sorted(set(paths) - set(per_image))
    if missing:
        raise ValueError(f"easy-VQA {split}: {len(missing)} images have no questions (e.g. {missing[:5]})")

    rows: dict[str, list[str | None]] = {name: [] for name in FEATURES}
    sources, captioned = Counter(), 0
    for image_id in sorted(paths):
        try:
            colour, shape, how = derive_colour_and_shape(per_image[image_id])
        except ValueError as error:
            raise ValueError(f"easy-VQA {split} image {image_id}: {error}") from None
        sources.update(f"{kind} {source}" for kind, source in zip(("colour", "shape"), how, strict=True))
        text = caption(colour, shape) if colour and shape else None
        captioned += bool(text)
        image_rows = [(None, None)] if config == "captions" else [(None, text)] * bool(text) + per_image[image_id]
        for question, answer in image_rows:
            rows["image"].append(str(paths[image_id]))
            rows["caption"].append(text)
            rows["question"].append(question)
            rows["answer"].append(answer)
    logger.info(
        "easy-VQA %s: %d of %d images captioned from their questions (%s)",
        split,
        captioned,
        len(paths),
        ", ".join(f"{name}: {count}" for name, count in sorted(sources.items())),
    )
    return datasets.Dataset.from_dict(rows, features=FEATURES, split=split)


def first_rows(rows: datasets.Dataset, count: int | None) -> datasets.Dataset:
    """The first `count` rows (all of them if None)."""
    return rows if count is None else rows.select(range(min(count, len(rows))))


def sample_rows(rows: datasets.Dataset, count: int | None, seed: int) -> datasets.Dataset:
    """`count` rows drawn at random (all of them if None or more than there are), in their original order."""
    if count is None or count >= len(rows):
        return rows
    return rows.select(sorted(random.Random(seed).sample(range(len(rows)), count)))


def sample_questions(
    rows: datasets.Dataset, count: int | None, seed: int, wording_share: float | None, per_image: int | None = None
) -> datasets.Dataset:
    """`count` question rows (all of them if None) drawn by `question_indices`: `wording_share` of the yes/no ones
    answer as their wording suggests, and with `per_image` they come `per_image` about each image drawn."""
    if count is None:
        return rows
    if wording_share is None:
        raise ValueError("a drawn count of questions needs a yes/no wording share (`question_indices`)")
    images = rows["image"] if per_image else None
    chosen = question_indices(
        rows["question"], rows["answer"], count, random.Random(seed), wording_share, images, per_image or None
    )
    return rows.select(chosen)


def questions_and_captions(rows: datasets.Dataset) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The question rows and the caption rows (no question) of the "vqa" configuration."""
    return (
        rows.filter(lambda question: question is not None, input_columns="question"),
        rows.filter(lambda question: question is None, input_columns="question"),
    )


def conversations_per_image(rows: datasets.Dataset) -> datasets.Dataset:
    """Question and caption rows grouped into one conversation per image, in first-seen order: the image and its
    caption turn (with no words: stage 2 draws a captioning instruction for it) first if it has one, then its
    questions. Stage 2 then computes the image's embeddings and the system prompt once for all of them."""
    turns: dict[str, list[dict]] = {}
    for path, question, answer in zip(rows["image"], rows["question"], rows["answer"], strict=True):
        user = {"role": "user", "content": [{"type": "text", "text": question}] if question else []}
        exchange = [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        conversation = turns.setdefault(path, [])
        conversation[len(conversation) if question else 0 : 0] = exchange
    for conversation in turns.values():
        conversation[0]["content"].insert(0, {"type": "image"})
    return datasets.Dataset.from_dict({"image": list(turns), "messages": list(turns.values())})


@dataclass
class Stage2Data:
    """What stage 2 trains on: `train` holds question and caption rows, or one conversation per image."""

    train: datasets.Dataset
    num_questions: int
    num_captions: int
    majority_answer: str
    """The commonest answer among all the candidate questions (a test's majority baseline)."""


def stage2_data(
    rows: datasets.Dataset,
    num_questions: int | None,
    num_captions: int | None,
    seed: int,
    wording_share: float | None,
    per_image: int | None = None,
    conversations: bool = False,
) -> Stage2Data:
    """Stage 2's training data from "vqa" rows: `num_questions` questions (`sample_questions`) and `num_captions`
    caption rows drawn at random (with `per_image`, of the images asked about, so that they join those images'
    conversations), as rows or (`conversations`) one conversation per image."""
    all_questions, captions = questions_and_captions(rows)
    questions = sample_questions(all_questions, num_questions, seed, wording_share, per_image)
    if per_image:
        asked = set(questions["image"])
        captions = captions.filter(lambda path: path in asked, input_columns="image")
    captions = sample_rows(captions, num_captions, seed)
    train = datasets.concatenate_datasets([questions, captions])
    return Stage2Data(
        train=conversations_per_image(train) if conversations else train,
        num_questions=len(questions),
        num_captions=len(captions),
        majority_answer=Counter(all_questions["answer"]).most_common(1)[0][0],
    )
