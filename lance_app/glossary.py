"""Short explanations of the words the pages use (ε, perplexity, B/C/H/W), one place for every caption."""
from __future__ import annotations

MODES = ("**B/C/H/W**: the modes of a conv layer's input activation — **B**atch, **C**hannel, **H**eight, "
         "**W**idth (a linear layer's: B and **F**eatures). A rank per mode is how many directions of that "
         "mode's unfolding are kept.")
EPS = ("**ε** (energy threshold, in (0, 1]): each mode keeps the fewest singular directions whose squared "
       "singular values add up to ε of the total; a higher ε keeps more, stores more, and errs less.")
PERPLEXITY = ("**perplexity**: the weight-gradient error of a compressed layer — how far the weight gradient "
              "computed from the stored low-rank activation is from the exact one on calibration batches, "
              "‖dW − dŴ‖_F (summed over the fine-tuned layers: **Σ perplexity**; 0 = exact).")
BUDGET = ("The **budget** caps the activation bytes the fine-tuned layers store for backward (Tucker core + "
          "factors, at the training batch size). The exact knapsack picks one ε per layer (or stores a layer "
          "raw) with the least Σ perplexity that fits.")
