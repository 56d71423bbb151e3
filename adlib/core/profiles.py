"""Run profiles: one code path, three sizes.

=========  ========================  ==========================================  ======================
profile    where                     data                                        budget (2 CPU cores)
=========  ========================  ==========================================  ======================
``smoke``  tests, CI                 tiny synthetic                              seconds per notebook
``book``   ``make book``, Colab CPU  offline data shipped or generated           <= 3 min per chapter
``paper``  GPU + internet            MVTec AD, VisA, CIFAR-10, real weights      as the paper
=========  ========================  ==========================================  ======================

Defined in: "How a chapter is built" (``book/chapter_template.ipynb``).
"""
from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")

PROFILES: dict[str, str] = {
    "smoke": "tests and CI: tiny synthetic data, seconds per notebook",
    "book": "the default: offline data shipped or generated, <= 3 min per chapter on 2 CPU cores",
    "paper": "the paper's setting: public data sets and pretrained weights, a GPU and internet",
}


def check_profile(name: str) -> str:
    """Return ``name`` if it is a known profile, else raise a ``ValueError`` listing the valid ones.

    Defined in: "How a chapter is built" (``book/chapter_template.ipynb``).
    """
    if name not in PROFILES:
        valid = ", ".join(f"{k!r} ({v})" for k, v in PROFILES.items())
        raise ValueError(f"Unknown profile {name!r}. Valid profiles are: {valid}.")
    return name


def by_profile(profile: str, *, smoke: T, book: T, paper: T) -> T:
    """Pick the value for ``profile``: ``by_profile("book", smoke=1, book=20, paper=200) == 20``.

    Chapters use it in their settings cell so that every knob that differs between profiles is
    visible in one place.

    Defined in: "How a chapter is built" (``book/chapter_template.ipynb``).
    """
    return {"smoke": smoke, "book": book, "paper": paper}[check_profile(profile)]
