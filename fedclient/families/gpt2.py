"""GPT-2: a decoder with learned absolute positions; no BOS, EOS ends next-token examples."""

from fedclient.families.base import FamilyAdapter

FAMILY = FamilyAdapter(model_type="gpt2", is_decoder=True, context_attr="n_positions")
