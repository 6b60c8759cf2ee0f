"""The held-out windows a search plan records."""


def test_the_windows_reserved_are_those_the_plans_held_out_figures_came_from():
    from types import SimpleNamespace

    from autocompress.provenance import Provenance
    from autocompress.search.holdout import windows_held_out_at_end

    def plan(text, holdout):
        return SimpleNamespace(provenance=Provenance(calib_text=text),
                               figures={"holdout": holdout} if holdout else {})
    assert windows_held_out_at_end(plan("/d/valid.txt",
                                          {"text": "/d/valid.txt", "from_end": 8})) == 8
    assert windows_held_out_at_end(plan("/d/valid.txt",
                                          {"text": "/d/other.txt", "from_end": 8})) == 0
    # the pydoc corpus
    assert windows_held_out_at_end(plan(None, {"text": None, "from_end": 4})) == 4
    assert windows_held_out_at_end(plan("/d/valid.txt", None)) == 0  # a plan made by `plan`
