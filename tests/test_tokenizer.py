import open_clip
import pytest

from diffalign.tokenizer import clip_tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "A red circle LEFT of two blue squares!!",
        "héllo wörld's   don't 123 4.5 #tags @you",
        "",
    ],
)
def test_ids_equal_open_clip(text):
    ours = clip_tokenizer()(text).input_ids
    reference = open_clip.tokenize([text])[0]
    assert ours == reference[reference != 0].tolist()


def test_pads_and_truncates_to_77():
    tokenizer = clip_tokenizer()
    ids = tokenizer("word " * 200, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
