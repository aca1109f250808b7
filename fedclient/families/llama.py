"""Llama: a decoder with rotary positions; every sentence starts with BOS."""

from fedclient.families.base import FamilyAdapter

FAMILY = FamilyAdapter(model_type="llama", is_decoder=True, prepend_bos=True)
