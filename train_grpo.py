"""Cortex stage 'grpo' (GSPO; settings: utils.py). Run: python3 train_grpo.py, or on GPUs: smart_train train_grpo.py --include localhost:0,1"""
from utils import train

if __name__ == "__main__":
    train("grpo")
