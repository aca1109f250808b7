"""BERT (and MiniLM, a BERT checkpoint): a bidirectional encoder; the tokenizer wraps [CLS] ... [SEP].

Encoders are not language models here, so the family supports classification only.
"""

from fedclient.families.base import FamilyAdapter

FAMILY = FamilyAdapter(
    model_type="bert",
    is_decoder=False,
    wrap_cls_sep=True,
    eos_for_next_token=False,
    tasks=("classification",),
)
