"""MEGABYTE (Yu et al. 2023, arXiv 2305.07185): a global model over byte patches, a local model per patch.

Wiring (the paper's Sec. 2.2 equations; ``P`` = patch size, ``D_G = d_global / P``, ``D_L = d_local``)::

    h_embed[j]     = E_global[x_j] + E_pos[j]                               byte j, width D_G
    g_in[0]        = pad_global                                             width P * D_G
    g_in[k]        = concat(h_embed[(k-1)P], ..., h_embed[kP - 1])          k >= 1: the *previous* patch
    g_out          = norm(global_blocks(g_in))                              [B, K, P * D_G]
    l_in[k, p]     = w_GL(g_out[k, p*D_G:(p+1)*D_G]) + (pad_local if p == 0 else E_local[x_{kP+p-1}])
    l_out[k]       = local_blocks(l_in[k, 0:P])                             each patch on its own
    p(x_t | x_<t)  = softmax(head(norm(l_out[k, p])))                       t = kP + p

Patch boundaries sit on the *target* bytes ``t``, so the global input of patch ``k`` holds every byte
before the patch's first target ``x_{kP}`` -- no "patch lag": the byte just before a patch reaches
its first target through the global path (the local input there is the pad).

longseq's convention is ``logits[:, i]`` predicts token ``i + 1``, so output ``i`` is the paper's
prediction of target ``t = i + 1``. For ``T`` input bytes the model evaluates targets ``t = 0..T``
(``K = T // P + 1`` patches; the target ``t = 0``, predicted from the pads alone, is computed -- the
targets after it attend to it -- and dropped). Exactly which bytes feed output ``i`` (target
``t = i + 1``, ``k = t // P``, ``p = t % P``):

* global path: ``x_0 .. x_{kP-1}`` -- every complete patch before target ``t``'s patch;
* local path: ``x_{kP} .. x_i`` -- the bytes of the target's patch before ``t``, byte-shifted by one
  (``p = 0``: none, the local input is the pad).

Targets past ``T`` that fill the last patch are padding: they are computed (the local model sees a
0 byte there) and sliced off before ``forward`` returns, so they never enter a loss, and causal
attention keeps them from touching real positions. The natural training window is ``T = mP - 1``
input bytes (``mP`` targets, no padding) but any ``T <= max_seq_len`` works, which strided
evaluation windows rely on.

Recurrent form: the global model advances one position per completed input patch with its own state
(KV caches under the ``cache`` policy, or GLA matrices); the local model advances one byte per
target with a fresh state at every patch boundary. ``step`` over any split equals ``forward``.
"""

from .model import MegabyteLM
from .state import MegabyteState

__all__ = ["MegabyteLM", "MegabyteState"]
