"""Auxiliary exits: classifier heads on intermediate layers of a student.

`attach_exits` returns a training model that shares every weight with the
student and adds one small head per named layer; one forward pass gives the
student's output and every exit's logits. `terms.AuxiliaryExits` trains the
heads (labels plus the deepest exit as a teacher, Be Your Own Teacher), and
`EarlyExit` answers each sample from the first exit confident enough.

References:

- [Zhang et al., 2019](https://arxiv.org/abs/1905.08094) (Be Your Own
  Teacher, BYOT)
- [Teerapittayanon et al., 2016](https://arxiv.org/abs/1709.01686)
  (BranchyNet early exits)
"""

from keras_selfdistill.exits.early_exit import EarlyExit
from keras_selfdistill.exits.early_exit import early_exit_tradeoff
from keras_selfdistill.exits.exits import Exits
from keras_selfdistill.exits.exits import attach_exits

__all__ = ["EarlyExit", "Exits", "attach_exits", "early_exit_tradeoff"]
