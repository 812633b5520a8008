"""Cortex stage 'cot' (settings: utils.py). Run: python3 train_cot.py, or on GPUs: smart_train train_cot.py --include localhost:0,1"""
from utils import train

if __name__ == "__main__":
    train("cot")
