"""``fxrec.utils.dynamic.dynamic_batch``: the batch over marked aliases, the caller's tensors untouched."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st

from fxrec.ragged import RaggedTensor
from fxrec.utils.dynamic import BATCH_ROWS, dynamic_batch


def marks(t: torch.Tensor) -> tuple[set | None, dict | None]:
    """Dynamo's unbacked dims of ``t`` and their shape ids (what ``mark_unbacked`` records)."""
    return getattr(t, "_dynamo_unbacked_indices", None), getattr(t, "_dynamo_shape_ids", None)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 5), lengths=st.lists(st.integers(0, 4), min_size=5, max_size=5), weighted=st.booleans())
def test_aliases_marked_and_the_callers_tensors_not(rows, lengths, weighted):
    lengths = lengths[:rows]
    offsets = torch.tensor([0] + lengths).cumsum(0)
    n = int(offsets[-1])
    ragged = RaggedTensor(torch.arange(n), offsets, torch.rand(n) if weighted else None)
    grad_leaf = torch.rand(rows, requires_grad=True)
    batch = {"label": torch.rand(rows, 1), "ids": ragged, "scalar": torch.tensor(3.0), "name": "tutorial",
             "nested": {"dense": torch.rand(rows, 2)}, "leaf": grad_leaf}
    out = dynamic_batch(batch)

    assert out.keys() == batch.keys() and out["name"] == "tutorial"
    assert isinstance(out["ids"], RaggedTensor) and (out["ids"].weight() is None) == (not weighted)
    originals, aliases = pytree.tree_leaves(batch), pytree.tree_leaves(out)
    assert len(originals) == len(aliases)
    for original, alias in zip(originals, aliases):
        if not isinstance(original, torch.Tensor):
            assert alias == original
            continue
        assert alias.data_ptr() == original.data_ptr() and torch.equal(alias, original)
        if original.requires_grad:  # kept as is: an alias would cut it from autograd
            assert alias is original
            continue
        assert alias is not original and marks(original) == (None, None)
    # dense tensors share the batch's size; a ragged tensor's parts each have their own; 0-d: none
    assert marks(out["label"]) == ({0}, {0: BATCH_ROWS})
    assert marks(out["nested"]["dense"]) == ({0}, {0: BATCH_ROWS})
    assert marks(out["scalar"])[0] is None
    for part in pytree.tree_leaves(out["ids"]):
        assert marks(part)[0] == {0} and not (marks(part)[1] or {}).get(0)
