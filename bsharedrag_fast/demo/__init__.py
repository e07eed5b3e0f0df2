"""The demo's data: WorthBuying-mini (a synthetic e-commerce RAG data set) and a BPE tokenizer trainer."""
from .tokenizer_train import SPECIAL_TOKEN_IDS, train_bpe_tokenizer
from .worthbuying import WorthBuyingPaths, generate_worthbuying

__all__ = ["SPECIAL_TOKEN_IDS", "WorthBuyingPaths", "generate_worthbuying", "train_bpe_tokenizer"]
