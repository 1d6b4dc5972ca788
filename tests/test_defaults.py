"""defaults.py: the config's per-member fields (those stacked models may differ in)."""
from adtr_jax import defaults

# What adtr_jax/members.py lets differ between the models of one stacked step: numbers and initial
# values, never array shapes. Written out here so that a field declared per-member by mistake, or one
# that loses the mark, fails this test.
EXPECTED = {'seed', 'dataset.category', 'train.learning_rate', 'train.weight_decay',
            'train.grad_clip_norm', 'train.warmup_fraction', 'train.final_lr_fraction',
            'train.num_epochs', 'train.min_steps', 'train.lr_decay_factor', 'model.embed_init_std',
            'model.tie_qk_init', 'model.pos_init'}


def test_per_member_fields_are_exactly_the_stackable_ones():
  assert isinstance(defaults.PER_MEMBER, frozenset)
  assert defaults.PER_MEMBER == EXPECTED


def test_every_per_member_name_is_a_leaf_field_of_the_config():
  config = defaults.get_config()
  for dotted in sorted(defaults.PER_MEMBER):
    section = config
    *parents, name = dotted.split('.')
    for parent in parents:
      section = section[parent]
    assert name in section, f'{dotted} is not a field of get_config()'
    assert not hasattr(section[name], 'keys'), f'{dotted} is a section, not a field'
