"""Item content vectors: the release-age block, worked out by hand."""

import numpy as np
import pandas as pd
import pytest

from stratarec.item_content import RELEASE_AGE_DIM, item_content, release_age_onehot

pytestmark = pytest.mark.unit


def test_release_age_buckets_by_hand():
    # Reference 1998. Buckets: age 0, 1, 2, 3, 4, 5, 6-8, 9-18, 19+, unknown (index 9).
    years = [1998, 1997, 1996, 1995, 1994, 1993, 1992, 1990, 1989, 1980, 1979, 1930]
    expected = [0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 8]
    onehot = release_age_onehot(np.array(years), 1998)
    assert onehot.shape == (len(years), RELEASE_AGE_DIM) == (12, 10)
    assert onehot.argmax(axis=1).tolist() == expected
    assert (onehot.sum(axis=1) == 1).all() and onehot.dtype == np.float32


def test_unknown_and_future_release_years():
    # The feature store writes -1 for unknown; the canonical table uses a nullable Int64.
    years = pd.array([-1, None, 0, 2001, 1998], dtype="Int64")
    assert release_age_onehot(years, 1998).argmax(axis=1).tolist() == [9, 9, 9, 0, 0]
    assert release_age_onehot(np.array([np.nan, 1997.0]), 1998).argmax(axis=1).tolist() == [9, 1]


def test_ages_follow_the_reference_year():
    # The same film is "new" to a model trained in its release year and back catalogue later.
    assert release_age_onehot(np.array([1998]), 1998).argmax() == 0
    assert release_age_onehot(np.array([1998]), 2003).argmax() == 5
    assert release_age_onehot(np.array([1998]), 2030).argmax() == 8


def test_item_content_appends_the_block_and_keeps_the_text():
    text = np.arange(6, dtype=np.float32).reshape(2, 3)
    content = item_content(text, [1998, 1990], 1998)
    assert content.shape == (2, 3 + RELEASE_AGE_DIM)
    np.testing.assert_array_equal(content[:, :3], text)
    assert content[0, 3 + 0] == 1 and content[1, 3 + 6] == 1 and content[:, 3:].sum() == 2
    np.testing.assert_array_equal(item_content(text, None, None, release_age=False), text)


def test_item_content_errors_name_the_problem():
    text = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="release_year"):
        item_content(text, None, 1998)
    with pytest.raises(ValueError, match="reference year"):
        item_content(text, [1998, 1997], None)
    with pytest.raises(ValueError, match="3 rows, text embeddings 2"):
        item_content(text, [1998, 1997, 1996], 1998)


def test_catalog_content_follows_the_config_and_the_data_window():
    from stratarec.config import StrataConfig
    from stratarec.steps import catalog_content

    # Catalogue rows out of id order, as the feature store may return them; -1 = unknown year.
    catalog = pd.DataFrame(
        {
            "item_id": [20, 10],
            "release_year": [-1, 2019],
            "text_embedding": [np.array([0.0, 1.0], np.float32), np.array([1.0, 0.0], np.float32)],
        }
    )
    cfg = StrataConfig()
    index, content = catalog_content(catalog, cfg, "2020-06-30T12:00:00+00:00")
    assert index.to_ids(np.array([1, 2])).tolist() == [10, 20]
    assert content.shape == (2, 2 + RELEASE_AGE_DIM)
    np.testing.assert_array_equal(content[:, :2], [[1, 0], [0, 1]])
    assert content[0, 2 + 1] == 1  # item 10: released 2019, one year before the 2020 window end
    assert content[1, 2 + 9] == 1  # item 20: unknown
    off = cfg.model_copy(update={"model": cfg.model.model_copy(update={"release_age": False})})
    assert catalog_content(catalog, off, "2020-06-30")[1].shape == (2, 2)
