"""A study's results file: kept after every step, resumed only under the same protocol."""

import pytest

from autocompress.errors import AutocompressError
from autocompress.studies.store import StudyFile


def test_resumed_under_the_same_protocol_only(tmp_path):
    path = tmp_path / "s.json"
    first = StudyFile(path, {"bits": (3.0, 4.0)}, "cells", resume=False)
    first.done["a"] = {"kl": 0.5}
    first.save()
    assert StudyFile(path, {"bits": (3.0, 4.0)}, "cells", resume=True).done == {"a": {"kl": 0.5}}
    assert StudyFile(path, {"bits": (3.0, 4.0)}, "cells", resume=False).done == {}
    with pytest.raises(AutocompressError, match=r"other settings \(bits\)"):
        StudyFile(path, {"bits": [3.0]}, "cells", resume=True)


def test_a_list_the_study_may_grow_is_extended_on_resume_never_shrunk(tmp_path):
    path = tmp_path / "s.json"
    first = StudyFile(path, {"models": ["a"], "seed": 0}, "models", resume=False,
                      extendable=("models",))
    first.done["a"] = {"kl": 0.5}
    first.save()
    grown = StudyFile(path, {"models": ["a", "b"], "seed": 0}, "models", resume=True,
                      extendable=("models",))
    assert grown.done == {"a": {"kl": 0.5}}
    grown.save()  # the protocol saved is the grown one
    assert StudyFile(path, {"models": ["a", "b"], "seed": 0}, "models", resume=True).done
    with pytest.raises(AutocompressError, match=r"holds models \['a'\] that this run leaves out"):
        StudyFile(path, {"models": ["b"], "seed": 0}, "models", resume=True,
                  extendable=("models",))
    with pytest.raises(AutocompressError, match=r"other settings \(seed\)"):
        StudyFile(path, {"models": ["a", "b", "c"], "seed": 1}, "models", resume=True,
                  extendable=("models",))
    with pytest.raises(AutocompressError, match=r"other settings \(models\)"):  # not growable
        StudyFile(path, {"models": ["a", "b", "c"], "seed": 0}, "models", resume=True)


@pytest.mark.parametrize("text", ["{ not json", '{"protocol": {}}', '{"protocol": [], "cells": {}}'])
def test_a_corrupt_file_is_one_clear_error(tmp_path, text):
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(AutocompressError, match="cannot be resumed.*--force"):
        StudyFile(path, {}, "cells", resume=True)
