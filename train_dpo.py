"""Cortex stage 'dpo' (settings: utils.py). Run: python3 train_dpo.py, or on GPUs: smart_train train_dpo.py --include localhost:0,1"""
from utils import train

if __name__ == "__main__":
    train("dpo")
