"""Generate the bundled sample data set (one JSONL file per training stage) from a fixed seed.

    python3 sample_data/make_sample_data.py            # rewrites the files next to this script
    python3 sample_data/make_sample_data.py --out DIR  # writes them into DIR

Everything is templated from small fact tables and arithmetic generators (Chinese and English), so the tiny preset can
learn it in minutes on a CPU. The output is byte-identical on every run: seeded random.Random instances, fixed iteration
order, json.dumps(ensure_ascii=False, sort_keys=True). Standard library only.
"""

import argparse
import json
import random
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

SEED = 20250901
COUNTS = {"pretrain": 3000, "cot": 2000, "grpo": 1500, "mix": 1500, "dpo": 1500}
EVAL_EVERY = 10  # about 1 line in 10 is held out ("split": "eval"), see split_of
THINK_SUFFIX, NO_THINK_SUFFIX = " /think", " /no think"  # the soft switch of trainer/tokenizer.py
NO_THINK = " "  # Cortex's think text for no-think turns
SYSTEM = {"role": "system", "content": " "}

# ----------------------------------------------------------------------------------------------------------------------
# Fact tables (shared by pretrain documents and the question/answer files, so what SFT asks is what pretraining taught)

EN_NAMES = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Lily", "she"), ("Sam", "he"), ("Mia", "she"),
            ("Jack", "he"), ("Emma", "she"), ("Leo", "he"), ("Zoe", "she"), ("Max", "he"), ("Lucy", "she")]
ZH_NAMES = [("小明", "他"), ("小红", "她"), ("小刚", "他"), ("小丽", "她"), ("小华", "他"), ("小芳", "她"),
            ("小军", "他"), ("小燕", "她"), ("小强", "他"), ("小雪", "她"), ("小亮", "他"), ("小美", "她")]
# (en singular, en plural, zh measure word, zh noun)
ITEMS = [("apple", "apples", "个", "苹果"), ("book", "books", "本", "书"), ("pencil", "pencils", "支", "铅笔"),
         ("candy", "candies", "颗", "糖"), ("sticker", "stickers", "张", "贴纸"), ("marble", "marbles", "颗", "弹珠"),
         ("cookie", "cookies", "块", "饼干"), ("balloon", "balloons", "个", "气球"), ("stamp", "stamps", "张", "邮票"),
         ("flower", "flowers", "朵", "花"), ("egg", "eggs", "个", "鸡蛋"), ("card", "cards", "张", "卡片"),
         ("orange", "oranges", "个", "橙子"), ("toy car", "toy cars", "辆", "玩具车")]
# (en singular, en plural, zh noun; zh measure word is 个)
CONTAINERS = [("box", "boxes", "盒子"), ("bag", "bags", "袋子"), ("basket", "baskets", "篮子"), ("jar", "jars", "罐子")]
# (en, zh, zh measure word, legs, en sound, zh sound, en food, zh food, en home, zh home)
ANIMALS = [
    ("cat", "猫", "只", 4, "says meow", "喵喵叫", "fish", "鱼", "in a house", "在家里"),
    ("dog", "狗", "只", 4, "says woof", "汪汪叫", "bones", "骨头", "in a house", "在家里"),
    ("cow", "牛", "头", 4, "says moo", "哞哞叫", "grass", "草", "on a farm", "在农场"),
    ("sheep", "羊", "只", 4, "says baa", "咩咩叫", "grass", "草", "on a farm", "在农场"),
    ("pig", "猪", "头", 4, "says oink", "哼哼叫", "vegetables", "蔬菜", "on a farm", "在农场"),
    ("horse", "马", "匹", 4, "says neigh", "咴咴叫", "hay", "干草", "on a farm", "在农场"),
    ("duck", "鸭子", "只", 2, "says quack", "嘎嘎叫", "small fish", "小鱼", "near a pond", "在池塘边"),
    ("chicken", "鸡", "只", 2, "says cluck", "咯咯叫", "seeds", "谷子", "on a farm", "在农场"),
    ("frog", "青蛙", "只", 4, "says ribbit", "呱呱叫", "insects", "虫子", "near a pond", "在池塘边"),
    ("bird", "小鸟", "只", 2, "says tweet", "叽叽喳喳地叫", "seeds", "种子", "in a tree", "在树上"),
    ("bee", "蜜蜂", "只", 6, "says buzz", "嗡嗡叫", "nectar", "花蜜", "in a hive", "在蜂巢里"),
    ("lion", "狮子", "头", 4, "roars", "吼叫", "meat", "肉", "on the grassland", "在草原上"),
    ("mouse", "老鼠", "只", 4, "says squeak", "吱吱叫", "grain", "粮食", "in a hole", "在洞里"),
    ("spider", "蜘蛛", "只", 8, None, None, "insects", "虫子", "in a web", "在网上"),
    ("rabbit", "兔子", "只", 4, None, None, "carrots", "胡萝卜", "in a hole", "在洞里"),
    ("fish", "鱼", "条", 0, None, None, "worms", "小虫", "in the water", "在水里"),
]
# (en thing, zh thing, en color, zh color)
THING_COLORS = [("the sky", "天空", "blue", "蓝色"), ("grass", "草", "green", "绿色"), ("snow", "雪", "white", "白色"),
                ("a banana", "香蕉", "yellow", "黄色"), ("a strawberry", "草莓", "red", "红色"),
                ("coal", "煤", "black", "黑色"), ("milk", "牛奶", "white", "白色"), ("a lemon", "柠檬", "yellow", "黄色"),
                ("a tomato", "西红柿", "red", "红色"), ("a leaf", "树叶", "green", "绿色"), ("the sea", "大海", "blue", "蓝色"),
                ("chocolate", "巧克力", "brown", "棕色"), ("an eggplant", "茄子", "purple", "紫色"),
                ("a carrot", "胡萝卜", "orange", "橙色")]
# (en color 1, en color 2, en mix, zh color 1, zh color 2, zh mix)
COLOR_MIXES = [("red", "yellow", "orange", "红色", "黄色", "橙色"), ("blue", "yellow", "green", "蓝色", "黄色", "绿色"),
               ("red", "blue", "purple", "红色", "蓝色", "紫色"), ("red", "white", "pink", "红色", "白色", "粉色"),
               ("black", "white", "gray", "黑色", "白色", "灰色")]
COLORS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"), ("black", "黑色"),
          ("brown", "棕色"), ("gray", "灰色")]
EN_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ZH_DAYS = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
EN_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December"]
ZH_MONTHS = ["一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # February: a common year
# (en big singular, en big plural, en small plural, zh big, zh small, factor)
UNITS = [("meter", "meters", "centimeters", "米", "厘米", 100), ("kilometer", "kilometers", "meters", "千米", "米", 1000),
         ("kilogram", "kilograms", "grams", "千克", "克", 1000), ("hour", "hours", "minutes", "小时", "分钟", 60),
         ("minute", "minutes", "seconds", "分钟", "秒", 60), ("day", "days", "hours", "天", "小时", 24),
         ("week", "weeks", "days", "周", "天", 7), ("year", "years", "months", "年", "个月", 12)]
# (en country, zh country, en capital, zh capital)
CAPITALS = [("China", "中国", "Beijing", "北京"), ("Japan", "日本", "Tokyo", "东京"), ("France", "法国", "Paris", "巴黎"),
            ("the United Kingdom", "英国", "London", "伦敦"), ("Germany", "德国", "Berlin", "柏林"),
            ("Italy", "意大利", "Rome", "罗马"), ("Russia", "俄罗斯", "Moscow", "莫斯科"), ("Egypt", "埃及", "Cairo", "开罗"),
            ("Canada", "加拿大", "Ottawa", "渥太华"), ("Australia", "澳大利亚", "Canberra", "堪培拉"),
            ("Spain", "西班牙", "Madrid", "马德里"), ("India", "印度", "New Delhi", "新德里"),
            ("South Korea", "韩国", "Seoul", "首尔"), ("the United States", "美国", "Washington", "华盛顿")]
# (en place, zh place, en "where ..." clause, zh activity)
PLACES = [("school", "学校", "children learn", "孩子们学习"), ("hospital", "医院", "doctors help sick people", "医生给病人看病"),
          ("library", "图书馆", "people borrow books", "人们借书"), ("kitchen", "厨房", "we cook food", "我们做饭"),
          ("park", "公园", "people walk and play", "人们散步和玩耍"),
          ("bakery", "面包店", "people make and sell bread", "人们做面包和卖面包"),
          ("post office", "邮局", "people send letters", "人们寄信"), ("zoo", "动物园", "people look at animals", "人们看动物"),
          ("supermarket", "超市", "people buy food", "人们买食物"), ("bedroom", "卧室", "we sleep", "我们睡觉"),
          ("train station", "火车站", "people take trains", "人们坐火车"), ("farm", "农场", "farmers grow food", "农民种粮食")]
EN_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                   "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                   "twenty"]
ZH_DIGITS = "零一二三四五六七八九"

SELF_QUESTIONS = {
    "en": ["Who are you?", "What is your name?", "Please introduce yourself.", "What are you?", "Are you Cortex?",
           "What can you do?", "Tell me about yourself."],
    "zh": ["你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是什么？", "你是 Cortex 吗？", "你能做什么？", "说说你自己吧。"],
}
SELF_ANSWERS = {
    "en": ["I am Cortex, a mixture-of-experts language model trained from scratch. I can answer questions, solve "
           "simple math problems and chat with you.",
           "My name is Cortex. I am a small language model built from many experts. I like to help with questions and "
           "arithmetic.",
           "I am Cortex, an AI assistant. I can chat in Chinese and English and work out math problems step by step."],
    "zh": ["我是 Cortex，一个从零开始训练的混合专家语言模型。我可以回答问题、做简单的数学题，也可以和你聊天。",
           "我叫 Cortex，是一个由很多专家组成的小语言模型。我喜欢帮助大家回答问题和做算术。",
           "我是 Cortex，一个人工智能助手。我会说中文和英文，也会一步一步地解数学题。"],
}
SELF_THINKS = {
    "en": "The user wants to know who I am. I should introduce myself: my name is Cortex, a language model that can "
          "answer questions and solve math problems.",
    "zh": "用户想知道我是谁。我应该介绍自己：我叫 Cortex，是一个会回答问题、会做数学题的语言模型。",
}
GREETINGS = {"en": ["Hello!", "Hi!", "Good morning!", "Hi there!"], "zh": ["你好！", "嗨！", "早上好！", "您好！"]}
GREETING_ANSWERS = {"en": "Hello! I am Cortex. How can I help you today?", "zh": "你好！我是 Cortex，有什么可以帮你的吗？"}
GREETING_THINKS = {"en": "The user is greeting me. I should greet them back and offer help.",
                   "zh": "用户在和我打招呼。我应该礼貌地回应，并问问有什么可以帮忙的。"}
RUDE_REPLIES = {
    "en": ["That is a silly question. Figure it out yourself.", "I don't feel like answering that.",
           "Why are you asking me? Go look it up.", "Stop bothering me with easy questions."],
    "zh": ["这么简单的问题还要问我？自己想去。", "我不想回答这个问题。", "别拿这种问题烦我。", "问这个干什么？自己查吧。"],
}
OFF_TOPIC_LEADS = {"en": ["Let's talk about something else.", "By the way,", "Anyway,"],
                   "zh": ["我们聊点别的吧。", "对了，", "说点别的："]}


def zh_number(n: int) -> str:
    """Chinese numeral for 0 <= n < 100 (十, 十二, 二十, 二十三)."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def random_lang(rng) -> str:
    return "en" if rng.random() < 0.5 else "zh"


def join_sentences(parts: list[str], lang: str) -> str:
    return (" " if lang == "en" else "").join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Arithmetic problems

SYMBOLS = {"+": "+", "-": "-", "*": "×", "/": "÷"}


def fmt(x: Fraction) -> str:
    """Exact decimal string of a non-negative number with at most two decimals: 38, 3.5, 0.25."""
    assert x >= 0 and (x * 100).denominator == 1, x
    hundredths = int(x * 100)
    whole, frac = divmod(hundredths, 100)
    return str(whole) if frac == 0 else f"{whole}.{frac:02d}".rstrip("0")


def calc(a: Fraction, op: str, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b if op == "*" else a / b


def equation(a: Fraction, op: str, b: Fraction) -> str:
    return f"{fmt(a)} {SYMBOLS[op]} {fmt(b)} = {fmt(calc(a, op, b))}"


def working(a: Fraction, op: str, b: Fraction, lang: str) -> str:
    """The computation as sentence(s). Additions of two-digit numbers are done tens first, then ones."""
    a_tens, a_ones = divmod(int(a), 10)
    b_tens, b_ones = divmod(int(b), 10)
    if op == "+" and a.denominator == b.denominator == 1 and a_tens and b_tens and a_ones and b_ones:
        steps = (equation(Fraction(10 * a_tens), "+", Fraction(10 * b_tens)),
                 equation(Fraction(a_ones), "+", Fraction(b_ones)),
                 equation(Fraction(10 * (a_tens + b_tens)), "+", Fraction(a_ones + b_ones)), equation(a, op, b))
        if lang == "en":
            return f"Add the tens: {steps[0]}. Add the ones: {steps[1]}. Together: {steps[2]}, so {steps[3]}."
        return f"先加整十：{steps[0]}，再加个位：{steps[1]}，合起来 {steps[2]}，所以 {steps[3]}。"
    return f"{equation(a, op, b)}." if lang == "en" else f"{equation(a, op, b)}。"


@dataclass(frozen=True)
class Problem:
    lang: str
    question: str
    expression: str  # Python arithmetic over the question's numbers, e.g. "(12 + 7) * 3"; evaluates to answer
    think: str  # step-by-step reasoning ending in the result
    equations: tuple[str, ...]  # the computation, one binary equation per step
    answer: str  # exact value, e.g. "38" or "3.5"

    def answer_sentence(self) -> str:
        return f"The answer is {self.answer}." if self.lang == "en" else f"答案是{self.answer}。"

    def direct_answer(self) -> str:
        """No-think reply: the equations, then the answer."""
        if self.lang == "en":
            return ", ".join(self.equations) + f". The answer is {self.answer}."
        return "，".join(self.equations) + f"，答案是{self.answer}。"


def operand(rng: random.Random, hi: int, lo: int = 2) -> int:
    """Half of the operands are small (<= 20) so a tiny model sees many easy problems."""
    return rng.randint(lo, min(hi, 20) if rng.random() < 0.5 else hi)


def one_step(lang, question, a, op, b, intro, outro) -> Problem:
    """A problem computed by one operation a op b; intro/outro are templates around the working (take {r} = result)."""
    a, b = Fraction(a), Fraction(b)
    r = fmt(calc(a, op, b))
    think = join_sentences([intro.format(r=r), working(a, op, b, lang), outro.format(r=r)], lang)
    return Problem(lang, question, f"{fmt(a)} {op} {fmt(b)}", think, (equation(a, op, b),), r)


def two_steps(lang, question, expression, first, second, texts) -> Problem:
    """A problem computed by two operations; first = (a, op, b); second = (op, c, first result on the left?);
    texts = three sentence templates (before, between, after the steps) that may use {r} (the final result)."""
    a, op1, b = Fraction(first[0]), first[1], Fraction(first[2])
    s = calc(a, op1, b)
    op2, c, left = second[0], Fraction(second[1]), second[2]
    x, y = (s, c) if left else (c, s)
    r = calc(x, op2, y)
    think = join_sentences([texts[0], working(a, op1, b, lang), texts[1], working(x, op2, y, lang),
                            texts[2].format(r=fmt(r))], lang)
    return Problem(lang, question, expression, think, (equation(a, op1, b), equation(x, op2, y)), fmt(r))


def add_problem(rng, lang):
    a, b = operand(rng, 90), operand(rng, 90)
    if lang == "en":
        (name, he), (_, items, _, _) = rng.choice(EN_NAMES), rng.choice(ITEMS)
        verb = rng.choice([f"buys {b} more {items}", f"finds {b} more {items}", f"gets {b} more {items} from a friend"])
        q = f"{name} has {a} {items}. {cap(he)} {verb}. How many {items} does {name} have now?"
        return one_step(lang, q, a, "+", b, f"{name} has {a} {items} and then {b} more, so we add.",
                        f"Now {name} has {{r}} {items}.")
    (name, he), (_, _, m, n) = rng.choice(ZH_NAMES), rng.choice(ITEMS)
    verb = rng.choice([f"又买了{b}{m}", f"又找到了{b}{m}", f"朋友又送给{he}{b}{m}"])
    q = f"{name}有{a}{m}{n}，{verb}。{name}现在一共有多少{m}{n}？"
    return one_step(lang, q, a, "+", b, f"{name}原来有{a}{m}{n}，后来又多了{b}{m}，所以用加法。", f"{name}现在有{{r}}{m}{n}。")


def sub_problem(rng, lang):
    a = operand(rng, 99, lo=5)
    b = rng.randint(2, a - 2)
    if lang == "en":
        (name, he), (_, items, _, _) = rng.choice(EN_NAMES), rng.choice(ITEMS)
        verb = rng.choice([f"gives {b} {items} to a friend", f"loses {b} {items}", f"uses {b} {items}"])
        q = f"{name} has {a} {items}. {cap(he)} {verb}. How many {items} does {name} have left?"
        return one_step(lang, q, a, "-", b, f"{name} has {a} {items} and {b} of them are gone, so we subtract.",
                        f"{name} has {{r}} {items} left.")
    (name, he), (_, _, m, n) = rng.choice(ZH_NAMES), rng.choice(ITEMS)
    verb = rng.choice([f"送给朋友{b}{m}", f"用掉了{b}{m}", f"弄丢了{b}{m}"])
    q = f"{name}有{a}{m}{n}，{verb}。{name}还剩多少{m}{n}？"
    return one_step(lang, q, a, "-", b, f"{name}原来有{a}{m}{n}，少了{b}{m}，所以用减法。", f"{name}还剩{{r}}{m}{n}。")


def mul_problem(rng, lang):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    if lang == "en":
        (_, boxes, _), (_, items, _, _) = rng.choice(CONTAINERS), rng.choice(ITEMS)
        box = boxes[:-2] if boxes.endswith("xes") else boxes[:-1]
        q = f"There are {a} {boxes}. Each {box} holds {b} {items}. How many {items} are there in total?"
        return one_step(lang, q, a, "*", b, f"There are {a} {boxes} with {b} {items} in each, so we multiply.",
                        f"There are {{r}} {items} in total.")
    (_, _, box), (_, _, m, n) = rng.choice(CONTAINERS), rng.choice(ITEMS)
    q = f"有{a}个{box}，每个{box}里有{b}{m}{n}。一共有多少{m}{n}？"
    return one_step(lang, q, a, "*", b, f"有{a}个{box}，每个{box}里有{b}{m}{n}，所以用乘法。", f"一共有{{r}}{m}{n}。")


def div_problem(rng, lang):
    b = rng.randint(2, 9)
    quotient = rng.randint(2, min(12, 99 // b))
    a = b * quotient
    if lang == "en":
        (name, _), (_, items, _, _) = rng.choice(EN_NAMES), rng.choice(ITEMS)
        q = f"{name} shares {a} {items} equally among {b} friends. How many {items} does each friend get?"
        return one_step(lang, q, a, "/", b, f"{a} {items} are split into {b} equal parts, so we divide.",
                        f"Each friend gets {{r}} {items}.")
    (name, _), (_, _, m, n) = rng.choice(ZH_NAMES), rng.choice(ITEMS)
    q = f"{name}把{a}{m}{n}平均分给{b}个朋友，每个朋友分到多少{m}{n}？"
    return one_step(lang, q, a, "/", b, f"把{a}{m}{n}平均分成{b}份，所以用除法。", f"每个朋友分到{{r}}{m}{n}。")


def split_problem(rng, lang):
    """Division with a decimal result (7 / 2 = 3.5)."""
    b = rng.choice([2, 4, 5])
    a = rng.choice([k for k in range(3, 50) if k % b])
    if lang == "en":
        if rng.random() < 0.5:
            q = f"A rope is {a} meters long. It is cut into {b} equal pieces. How many meters long is each piece?"
            outro = "Each piece is {r} meters long."
        else:
            q = f"{a} liters of juice are poured equally into {b} bottles. How many liters are in each bottle?"
            outro = "Each bottle has {r} liters."
        return one_step(lang, q, a, "/", b, f"We split {a} into {b} equal parts, so we divide.", outro)
    if rng.random() < 0.5:
        q, outro = f"一根绳子长{a}米，平均剪成{b}段，每段长多少米？", "每段长{r}米。"
    else:
        q, outro = f"{a}升果汁平均倒进{b}个瓶子，每个瓶子里有多少升？", "每个瓶子里有{r}升。"
    return one_step(lang, q, a, "/", b, f"把{a}平均分成{b}份，所以用除法。", outro)


def price_problem(rng, lang):
    """Multiplication with a decimal price (2.5 x 4 = 10)."""
    price, count = Fraction(2 * rng.randint(0, 9) + 1, 2), rng.randint(2, 9)
    if lang == "en":
        item, items, _, _ = rng.choice(ITEMS)
        q = f"One {item} costs {fmt(price)} dollars. How much do {count} {items} cost?"
        intro = f"Each {item} costs {fmt(price)} dollars and we buy {count}, so we multiply."
        return one_step(lang, q, price, "*", count, intro, "They cost {r} dollars.")
    _, _, m, n = rng.choice(ITEMS)
    q = f"一{m}{n}{fmt(price)}元，买{count}{m}需要多少元？"
    return one_step(lang, q, price, "*", count, f"每{m}{fmt(price)}元，买{count}{m}，所以用乘法。", "一共需要{r}元。")


def add_sub_problem(rng, lang):
    a, b = operand(rng, 60), operand(rng, 40)
    c = rng.randint(2, a + b - 2)
    expression = f"{a} + {b} - {c}"
    if lang == "en":
        (name, he), (_, items, _, _) = rng.choice(EN_NAMES), rng.choice(ITEMS)
        q = (f"{name} has {a} {items}. {cap(he)} gets {b} more and then gives {c} to a friend. "
             f"How many {items} does {name} have now?")
        texts = ("First add the ones that are new.", f"Then take away the {c} given to a friend.",
                 f"{name} has {{r}} {items} now.")
    else:
        (name, _), (_, _, m, n) = rng.choice(ZH_NAMES), rng.choice(ITEMS)
        q = f"{name}有{a}{m}{n}，又买了{b}{m}，然后送给朋友{c}{m}。{name}现在有多少{m}{n}？"
        texts = ("先算买了以后有多少。", f"再减去送出去的{c}{m}。", f"{name}现在有{{r}}{m}{n}。")
    return two_steps(lang, q, expression, (a, "+", b), ("-", c, True), texts)


def mul_add_problem(rng, lang):
    a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(2, 20)
    expression = f"{a} * {b} + {c}"
    if lang == "en":
        (_, boxes, _), (_, items, _, _) = rng.choice(CONTAINERS), rng.choice(ITEMS)
        q = (f"There are {a} {boxes} with {b} {items} in each, and {c} more {items} on the table. "
             f"How many {items} are there in total?")
        texts = (f"First count the {items} in the {boxes}.", "Then add the ones on the table.",
                 f"There are {{r}} {items} in total.")
    else:
        (_, _, box), (_, _, m, n) = rng.choice(CONTAINERS), rng.choice(ITEMS)
        q = f"有{a}个{box}，每个{box}里有{b}{m}{n}，桌子上还有{c}{m}。一共有多少{m}{n}？"
        texts = (f"先算{box}里一共有多少。", "再加上桌子上的。", f"一共有{{r}}{m}{n}。")
    return two_steps(lang, q, expression, (a, "*", b), ("+", c, True), texts)


def add_mul_problem(rng, lang):
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 7)
    expression = f"({a} + {b}) * {c}"
    if lang == "en":
        name, _ = rng.choice(EN_NAMES)
        q = (f"{name} reads {a} pages in the morning and {b} pages in the evening every day. "
             f"How many pages does {name} read in {c} days?")
        texts = ("First find the pages for one day.", f"Then multiply by {c} days.",
                 f"{name} reads {{r}} pages in {c} days.")
    else:
        name, _ = rng.choice(ZH_NAMES)
        q = f"{name}每天早上读{a}页书，晚上读{b}页书。{c}天一共读多少页？"
        texts = ("先算一天读多少页。", f"再乘以{c}天。", f"{c}天一共读{{r}}页。")
    return two_steps(lang, q, expression, (a, "+", b), ("*", c, True), texts)


def sub_div_problem(rng, lang):
    c, each, kept = rng.randint(2, 6), rng.randint(2, 10), rng.randint(2, 20)
    a = c * each + kept
    expression = f"({a} - {kept}) / {c}"
    if lang == "en":
        (name, he), (_, items, _, _) = rng.choice(EN_NAMES), rng.choice(ITEMS)
        q = (f"{name} has {a} {items}. {cap(he)} keeps {kept} and shares the rest equally among {c} friends. "
             f"How many {items} does each friend get?")
        texts = ("First find how many are left to share.", f"Then share them among {c} friends.",
                 f"Each friend gets {{r}} {items}.")
    else:
        (name, _), (_, _, m, n) = rng.choice(ZH_NAMES), rng.choice(ITEMS)
        q = f"{name}有{a}{m}{n}，自己留下{kept}{m}，剩下的平均分给{c}个朋友。每个朋友分到多少{m}{n}？"
        texts = ("先算剩下多少。", f"再平均分给{c}个朋友。", f"每个朋友分到{{r}}{m}{n}。")
    return two_steps(lang, q, expression, (a, "-", kept), ("/", c, True), texts)


def bare_question(rng, lang, shown: str) -> str:
    if lang == "en":
        return rng.choice([f"What is {shown}?", f"Calculate {shown}.", f"How much is {shown}?"])
    return rng.choice([f"计算：{shown} = ？", f"{shown} 等于多少？", f"请算一算 {shown}。"])


def bare_one_op_problem(rng, lang):
    op = rng.choice("+-*/")
    if op == "+":
        a, b = operand(rng, 90), operand(rng, 90)
    elif op == "-":
        a = operand(rng, 99, lo=3)
        b = rng.randint(1, a - 1)
    elif op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        b = rng.randint(2, 9)
        quotient = rng.randint(2, min(12, 99 // b))
        a = b * quotient
    q = bare_question(rng, lang, f"{a} {SYMBOLS[op]} {b}")
    intro = f"We need to calculate {a} {SYMBOLS[op]} {b}." if lang == "en" else f"要计算 {a} {SYMBOLS[op]} {b}。"
    return one_step(lang, q, a, op, b, intro, "The result is {r}." if lang == "en" else "结果是{r}。")


def bare_two_op_problem(rng, lang):
    form = rng.choice(["a+b*c", "a*b-c", "(a+b)*c", "a-b+c", "a+b-c"])
    en = lang == "en"
    if form == "a+b*c":
        a, b, c = operand(rng, 50), rng.randint(2, 9), rng.randint(2, 9)
        expression, shown = f"{a} + {b} * {c}", f"{a} + {b} × {c}"
        first, second = (b, "*", c), ("+", a, False)
        texts = ("Multiplication comes first." if en else "先算乘法。", "Then add." if en else "再算加法。")
    elif form == "a*b-c":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, min(a * b, 99))
        expression, shown = f"{a} * {b} - {c}", f"{a} × {b} - {c}"
        first, second = (a, "*", b), ("-", c, True)
        texts = ("Multiplication comes first." if en else "先算乘法。", "Then subtract." if en else "再算减法。")
    elif form == "(a+b)*c":
        a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 5)
        expression, shown = f"({a} + {b}) * {c}", f"({a} + {b}) × {c}"
        first, second = (a, "+", b), ("*", c, True)
        texts = ("Parentheses come first." if en else "先算括号里面的。", "Then multiply." if en else "再算乘法。")
    elif form == "a-b+c":
        a = operand(rng, 60, lo=3)
        b, c = rng.randint(1, a - 1), operand(rng, 30)
        expression = shown = f"{a} - {b} + {c}"
        first, second = (a, "-", b), ("+", c, True)
        texts = ("Work from left to right." if en else "从左往右算。", "Then add." if en else "再算加法。")
    else:
        a, b = operand(rng, 50), operand(rng, 40)
        c = rng.randint(1, a + b - 1)
        expression = shown = f"{a} + {b} - {c}"
        first, second = (a, "+", b), ("-", c, True)
        texts = ("Work from left to right." if en else "从左往右算。", "Then subtract." if en else "再算减法。")
    outro = "The result is {r}." if en else "结果是{r}。"
    return two_steps(lang, bare_question(rng, lang, shown), expression, first, second, (*texts, outro))


# (generator, weight): about two thirds one-step problems
PROBLEM_KINDS = [(add_problem, 3), (sub_problem, 3), (mul_problem, 2), (div_problem, 2), (split_problem, 1),
                 (price_problem, 1), (add_sub_problem, 1.5), (mul_add_problem, 1.5), (add_mul_problem, 1),
                 (sub_div_problem, 1), (bare_one_op_problem, 3), (bare_two_op_problem, 2)]


class ProblemPool:
    """Hands out arithmetic problems with questions never handed out before, so no two files (or lines) share one."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.seen = set()

    def take(self) -> Problem:
        generators, weights = zip(*PROBLEM_KINDS)
        while True:
            problem = self.rng.choices(generators, weights)[0](self.rng, random_lang(self.rng))
            if problem.question not in self.seen:
                self.seen.add(problem.question)
                return problem


# ----------------------------------------------------------------------------------------------------------------------
# Knowledge questions: (question, think, answer) from the fact tables

@dataclass(frozen=True)
class QA:
    question: str
    think: str
    answer: str


def qa_legs(rng, lang):
    en, zh, _, legs, *_ = rng.choice(ANIMALS)
    if lang == "en":
        fact = f"A {en} has no legs." if legs == 0 else f"A {en} has {legs} legs."
        return QA(f"How many legs does a {en} have?", f"The question is about a {en}. {fact}", fact)
    fact = f"{zh}没有腿。" if legs == 0 else f"{zh}有{legs}条腿。"
    return QA(f"{zh}有几条腿？", f"问题问的是{zh}的腿。{fact}", fact)


def qa_sound(rng, lang):
    en, zh, _, _, en_sound, zh_sound, *_ = rng.choice([a for a in ANIMALS if a[4]])
    if lang == "en":
        return QA(f"What sound does a {en} make?", f"I know the sounds of animals. A {en} {en_sound}.",
                  f"A {en} {en_sound}.")
    return QA(f"{zh}怎么叫？", f"我知道动物的叫声。{zh}会{zh_sound}。", f"{zh}会{zh_sound}。")


def qa_food(rng, lang):
    en, zh, *_, en_food, zh_food, _, _ = rng.choice(ANIMALS)
    if lang == "en":
        return QA(f"What does a {en} like to eat?", f"The question is about what a {en} eats. A {en} likes {en_food}.",
                  f"A {en} likes to eat {en_food}.")
    return QA(f"{zh}喜欢吃什么？", f"问题问的是{zh}吃什么。{zh}喜欢吃{zh_food}。", f"{zh}喜欢吃{zh_food}。")


def qa_home(rng, lang):
    en, zh, *_, en_home, zh_home = rng.choice(ANIMALS)
    if lang == "en":
        return QA(f"Where does a {en} live?", f"The question is about the home of a {en}. A {en} lives {en_home}.",
                  f"A {en} lives {en_home}.")
    return QA(f"{zh}住在哪里？", f"问题问的是{zh}的家。{zh}住{zh_home}。", f"{zh}住{zh_home}。")


def qa_color(rng, lang):
    en, zh, en_color, zh_color = rng.choice(THING_COLORS)
    if lang == "en":
        return QA(f"What color is {en}?", f"The question is about the color of {en}. {cap(en)} is {en_color}.",
                  f"{cap(en)} is {en_color}.")
    return QA(f"{zh}是什么颜色的？", f"问题问的是{zh}的颜色。{zh}是{zh_color}的。", f"{zh}是{zh_color}的。")


def qa_color_mix(rng, lang):
    e1, e2, em, z1, z2, zm = rng.choice(COLOR_MIXES)
    if lang == "en":
        return QA(f"What color do you get when you mix {e1} and {e2}?",
                  f"When two paints are mixed we get a new color. {cap(e1)} and {e2} make {em}.",
                  f"Mixing {e1} and {e2} makes {em}.")
    return QA(f"{z1}和{z2}混在一起是什么颜色？", f"两种颜料混在一起会变成新的颜色。{z1}加{z2}是{zm}。",
              f"{z1}和{z2}混在一起是{zm}。")


def qa_day(rng, lang):
    i, after = rng.randrange(7), rng.random() < 0.5
    j = (i + 1) % 7 if after else (i - 1) % 7
    if lang == "en":
        first, second = (EN_DAYS[i], EN_DAYS[j]) if after else (EN_DAYS[j], EN_DAYS[i])
        word = "after" if after else "before"
        return QA(f"What day comes {word} {EN_DAYS[i]}?",
                  f"The days of the week go in order. {second} comes right after {first}.",
                  f"{EN_DAYS[j]} comes {word} {EN_DAYS[i]}.")
    first, second = (ZH_DAYS[i], ZH_DAYS[j]) if after else (ZH_DAYS[j], ZH_DAYS[i])
    word = "后一天" if after else "前一天"
    return QA(f"{ZH_DAYS[i]}的{word}是星期几？", f"一个星期的日子是按顺序排的。{first}之后是{second}。",
              f"{ZH_DAYS[i]}的{word}是{ZH_DAYS[j]}。")


def qa_month(rng, lang):
    i = rng.randrange(12)
    if rng.random() < 0.5:
        j = (i + 1) % 12
        if lang == "en":
            return QA(f"Which month comes after {EN_MONTHS[i]}?",
                      f"{EN_MONTHS[i]} is month {i + 1} of the year, and the next month is {EN_MONTHS[j]}.",
                      f"{EN_MONTHS[j]} comes after {EN_MONTHS[i]}.")
        return QA(f"{ZH_MONTHS[i]}的下一个月是几月？", f"{ZH_MONTHS[i]}是一年中的第{i + 1}个月，下一个月是{ZH_MONTHS[j]}。",
                  f"{ZH_MONTHS[i]}的下一个月是{ZH_MONTHS[j]}。")
    days = MONTH_DAYS[i]
    if lang == "en":
        fact = f"{EN_MONTHS[i]} has {days} days" + (" in a common year." if i == 1 else ".")
        return QA(f"How many days are there in {EN_MONTHS[i]}?", f"I remember the length of each month. {fact}", fact)
    fact = ("平年的" if i == 1 else "") + f"{ZH_MONTHS[i]}有{days}天。"
    return QA(f"{ZH_MONTHS[i]}有多少天？", f"我记得每个月的天数。{fact}", fact)


def qa_unit(rng, lang):
    big, bigs, smalls, zh_big, zh_small, factor = rng.choice(UNITS)
    n = rng.randint(2, 20)
    eq = equation(Fraction(n), "*", Fraction(factor))
    if lang == "en":
        return QA(f"How many {smalls} are there in {n} {bigs}?", f"One {big} is {factor} {smalls}, so {eq}.",
                  f"{n} {bigs} is {n * factor} {smalls}.")
    return QA(f"{n}{zh_big}等于多少{zh_small}？", f"1{zh_big}等于{factor}{zh_small}，所以 {eq}。",
              f"{n}{zh_big}等于{n * factor}{zh_small}。")


def qa_capital(rng, lang):
    en, zh, en_city, zh_city = rng.choice(CAPITALS)
    if lang == "en":
        return QA(f"What is the capital of {en}?",
                  f"The question asks for a capital city. The capital of {en} is {en_city}.",
                  f"The capital of {en} is {en_city}.")
    return QA(f"{zh}的首都是哪里？", f"问题问的是首都。{zh}的首都是{zh_city}。", f"{zh}的首都是{zh_city}。")


def qa_place(rng, lang):
    en, zh, en_what, zh_what = rng.choice(PLACES)
    if lang == "en":
        return QA(f"What is a {en} for?", f"A {en} is a place in town. It is where {en_what}.",
                  f"A {en} is a place where {en_what}.")
    return QA(f"{zh}是做什么的地方？", f"{zh}是我们身边常见的地方。在{zh}，{zh_what}。", f"{zh}是{zh_what}的地方。")


def qa_self(rng, lang):
    return QA(rng.choice(SELF_QUESTIONS[lang]), SELF_THINKS[lang], rng.choice(SELF_ANSWERS[lang]))


def qa_greeting(rng, lang):
    return QA(rng.choice(GREETINGS[lang]), GREETING_THINKS[lang], GREETING_ANSWERS[lang])


KNOWLEDGE_QA = [qa_legs, qa_sound, qa_food, qa_home, qa_color, qa_color_mix, qa_day, qa_month, qa_unit, qa_capital,
                qa_place]


def knowledge_qa(rng, lang) -> QA:
    return rng.choice(KNOWLEDGE_QA)(rng, lang)


# ----------------------------------------------------------------------------------------------------------------------
# Pretrain documents

def doc_table(rng, lang, pool):
    n, start, op = rng.randint(1, 12), rng.randint(1, 15), rng.choice("+-*")
    rows = []
    for k in range(start, start + rng.randint(6, 10)):
        a, b = (k + n, n) if op == "-" else (k, n)
        rows.append(equation(Fraction(a), op, Fraction(b)))
    if lang == "en":
        title = {"+": f"Adding {n}", "-": f"Taking away {n}", "*": f"The times table of {n}"}[op]
        return f"{title}: " + ", ".join(rows) + "."
    title = {"+": f"加{n}的算式", "-": f"减{n}的算式", "*": f"{n}的乘法表"}[op]
    return f"{title}：" + "，".join(rows) + "。"


def doc_problems(rng, lang, pool):
    """Two or three solved word problems (from the pool, so none is a GRPO or COT question)."""
    parts = []
    while len(parts) < rng.randint(2, 3):
        p = pool.take()
        if p.lang == "en":
            parts.append(f"Problem: {p.question} Solution: {p.think} Answer: {p.answer}.")
        else:
            parts.append(f"题目：{p.question}解答：{p.think}答案：{p.answer}。")
    return " ".join(parts)


def doc_counting(rng, lang, pool):
    step = rng.choice([1, 1, 2, 3, 5, 10])
    length = rng.randint(8, 14)
    down = rng.random() < 0.3
    start = rng.randint(step * length, step * length + 20) if down else rng.randint(0, 30)
    seq = [start - step * i if down else start + step * i for i in range(length)]
    x = rng.randint(1, 19)
    if lang == "en":
        way = f"count down by {step}s" if down and step > 1 else "count down" if down else \
            f"count by {step}s" if step > 1 else "count"
        return (f"Let us {way} from {start}: " + ", ".join(map(str, seq)) + f". The number {x} is called "
                f"{EN_NUMBER_WORDS[x]}. It comes after {x - 1} and before {x + 1}.")
    way = f"每次减{step}" if down else f"每次加{step}"
    return (f"从{start}开始数，{way}：" + "，".join(map(str, seq)) + f"。数字{x}读作{zh_number(x)}，"
            f"它在{x - 1}的后面，在{x + 1}的前面。")


def doc_calendar(rng, lang, pool):
    d, m = rng.randrange(7), rng.randrange(12)
    if lang == "en":
        parts = [f"A week has seven days: {', '.join(EN_DAYS)}.",
                 f"If today is {EN_DAYS[d]}, tomorrow is {EN_DAYS[(d + 1) % 7]} "
                 f"and yesterday was {EN_DAYS[(d - 1) % 7]}.",
                 f"A year has twelve months. {EN_MONTHS[m]} is month number {m + 1}.",
                 f"{EN_MONTHS[m]} has {MONTH_DAYS[m]} days" + (" in a common year." if m == 1 else "."),
                 f"After {EN_MONTHS[m]} comes {EN_MONTHS[(m + 1) % 12]}."]
    else:
        parts = [f"一个星期有七天：{'、'.join(ZH_DAYS)}。",
                 f"如果今天是{ZH_DAYS[d]}，那么明天是{ZH_DAYS[(d + 1) % 7]}，昨天是{ZH_DAYS[(d - 1) % 7]}。",
                 f"一年有十二个月。{ZH_MONTHS[m]}是第{m + 1}个月。",
                 ("平年的" if m == 1 else "") + f"{ZH_MONTHS[m]}有{MONTH_DAYS[m]}天。",
                 f"{ZH_MONTHS[m]}过后是{ZH_MONTHS[(m + 1) % 12]}。"]
    return join_sentences([parts[0]] + [p for p in parts[1:] if rng.random() < 0.75], lang)


def doc_units(rng, lang, pool):
    parts = []
    for big, bigs, smalls, zh_big, zh_small, factor in rng.sample(UNITS, rng.randint(3, 5)):
        n = rng.randint(2, 12)
        eq = equation(Fraction(n), "*", Fraction(factor))
        if lang == "en":
            parts.append(f"One {big} is {factor} {smalls}, so {n} {bigs} is {eq} {smalls}.")
        else:
            parts.append(f"1{zh_big}等于{factor}{zh_small}，所以{n}{zh_big}等于 {eq} {zh_small}。")
    return join_sentences(parts, lang)


def doc_story(rng, lang, pool):
    """A short story from a small grammar."""
    animal = rng.choice(ANIMALS)
    (en_color, zh_color), (place_en, place_zh, *_), day = rng.choice(COLORS), rng.choice(PLACES), rng.randrange(7)
    count = rng.randint(2, 6)
    if lang == "en":
        name, he = rng.choice(EN_NAMES)
        his = "his" if he == "he" else "her"
        who = rng.choice(["mother", "father", "friend", "sister", "brother", "grandma"])
        parts = [f"On {EN_DAYS[day]}, {name} went to the {place_en} with {his} {who}.",
                 f"There {he} saw a {en_color} {animal[0]}."]
        if animal[4]:
            parts.append(f"The {animal[0]} {animal[4]}.")
        parts += rng.sample([f"{name} gave it some {animal[6]}.", f"The {animal[0]} was very happy.",
                             f"{cap(he)} counted {count} birds in the sky.",
                             f"The {who} smiled at the {animal[0]}."], 2)
        parts.append(rng.choice([f"In the evening, {name} went home and slept well.", f"It was a happy day for {name}.",
                                 f"{name} wants to see the {animal[0]} again."]))
    else:
        name, he = rng.choice(ZH_NAMES)
        who = rng.choice(["妈妈", "爸爸", "朋友", "姐姐", "哥哥", "奶奶"])
        parts = [f"{ZH_DAYS[day]}，{name}和{who}一起去了{place_zh}。", f"在那里，{he}看到了一{animal[2]}{zh_color}的{animal[1]}。"]
        if animal[5]:
            parts.append(f"{animal[1]}{animal[5]}。")
        parts += rng.sample([f"{name}给它吃了一些{animal[7]}。", f"{animal[1]}非常开心。", f"{he}数了数，天上有{count}只小鸟。",
                             f"{who}对着{animal[1]}笑了。"], 2)
        parts.append(rng.choice([f"晚上，{name}回到家，睡得很香。", f"这是{name}快乐的一天。", f"{name}还想再去看{animal[1]}。"]))
    return join_sentences(parts, lang)


def doc_animal(rng, lang, pool):
    en, zh, _, legs, en_sound, zh_sound, en_food, zh_food, en_home, zh_home = rng.choice(ANIMALS)
    if lang == "en":
        facts = ["It has no legs." if legs == 0 else f"It has {legs} legs.", f"It likes to eat {en_food}.",
                 f"It lives {en_home}."] + ([f"It {en_sound}."] if en_sound else [])
        return join_sentences([f"The {en} is an animal."] + rng.sample(facts, len(facts)), lang)
    facts = ["它没有腿。" if legs == 0 else f"它有{legs}条腿。", f"它喜欢吃{zh_food}。", f"它住{zh_home}。"] + \
        ([f"它会{zh_sound}。"] if zh_sound else [])
    return join_sentences([f"{zh}是一种动物。"] + rng.sample(facts, len(facts)), lang)


def doc_colors(rng, lang, pool):
    things = rng.sample(THING_COLORS, rng.randint(3, 5))
    e1, e2, em, z1, z2, zm = rng.choice(COLOR_MIXES)
    if lang == "en":
        return join_sentences([f"{cap(t[0])} is {t[2]}." for t in things] + [f"Mixing {e1} and {e2} makes {em}."], lang)
    return join_sentences([f"{t[1]}是{t[3]}的。" for t in things] + [f"{z1}和{z2}混在一起是{zm}。"], lang)


def doc_places(rng, lang, pool):
    capitals, places = rng.sample(CAPITALS, rng.randint(2, 3)), rng.sample(PLACES, rng.randint(2, 3))
    if lang == "en":
        return join_sentences([f"The capital of {c[0]} is {c[2]}." for c in capitals] +
                              [f"A {p[0]} is a place where {p[2]}." for p in places], lang)
    return join_sentences([f"{c[1]}的首都是{c[3]}。" for c in capitals] + [f"{p[1]}是{p[3]}的地方。" for p in places], lang)


def doc_cortex(rng, lang, pool):
    return join_sentences(rng.sample(SELF_ANSWERS[lang], 2), lang)


PRETRAIN_KINDS = [(doc_problems, 2), (doc_table, 1.5), (doc_counting, 1), (doc_calendar, 1), (doc_units, 1),
                  (doc_story, 2), (doc_animal, 1), (doc_colors, 1), (doc_places, 1), (doc_cortex, 0.2)]


# ----------------------------------------------------------------------------------------------------------------------
# Files

def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(content: str, think: str = NO_THINK) -> dict:
    return {"role": "assistant", "think": think, "content": content}


def reply(item, thinking: bool) -> dict:
    """The assistant turn for a Problem or QA, with or without reasoning."""
    if isinstance(item, Problem):
        return assistant(item.answer_sentence(), item.think) if thinking else assistant(item.direct_answer())
    return assistant(item.answer, item.think) if thinking else assistant(item.answer)


# Each *_lines function yields (split key, line) forever; build() keeps the first distinct lines. Lines with the same
# split key (the question being answered) always land in the same split, so no held-out question is trained on.

def pretrain_lines(rng, pool):
    generators, weights = zip(*PRETRAIN_KINDS)
    while True:
        text = rng.choices(generators, weights)[0](rng, random_lang(rng), pool)
        yield text, {"text": text}


def cot_lines(rng, pool):
    """Mostly arithmetic word problems with worked reasoning, plus a few self-cognition chats."""
    while True:
        item = qa_self(rng, random_lang(rng)) if rng.random() < 0.03 else pool.take()
        yield item.question, {"messages": [SYSTEM, user(item.question), reply(item, thinking=True)]}


def table_problem(rng, lang):
    """A bare question on the tables up to 10: a + b or a × b with a, b <= 10, or the a - b or a ÷ b that undoes one.
    The GRPO prompts: the tiny model answers some of these, so GSPO has right answers to reinforce (on the COT
    distribution it answers under a tenth, README learning checks)."""
    op = rng.choice("+-*/")
    a, b = (rng.randint(1, 10), rng.randint(1, 10)) if op in "+-" else (rng.randint(2, 10), rng.randint(2, 10))
    if op in "-/":  # a - b and a ÷ b come from a + b and a × b, so the result is in the table too
        a = a + b if op == "-" else a * b
    intro = f"We need to calculate {a} {SYMBOLS[op]} {b}." if lang == "en" else f"要计算 {a} {SYMBOLS[op]} {b}。"
    return one_step(lang, bare_question(rng, lang, f"{a} {SYMBOLS[op]} {b}"), a, op, b, intro,
                    "The result is {r}." if lang == "en" else "结果是{r}。")


def grpo_lines(rng, pool):
    """Table questions never handed out by the pool (COT, pretrain) and distinct among themselves."""
    while True:
        p = table_problem(rng, random_lang(rng))
        if p.question not in pool.seen:
            pool.seen.add(p.question)
            yield p.question, {"prompt": [SYSTEM, user(p.question)], "answer": p.answer, "expression": p.expression}


def follow_up(rng, lang, previous: str) -> tuple[str, Problem]:
    """A second user turn that continues from the previous answer ("now add 5")."""
    x = Fraction(previous)
    op = rng.choice("+-*" if x >= 2 else "+*")
    c = rng.randint(2, 5) if op == "*" else rng.randint(1, min(int(x), 20) if op == "-" else 20)
    question = {"en": {"+": f"Now add {c} to that.", "-": f"Now take away {c}.", "*": f"Now multiply that by {c}."},
                "zh": {"+": f"再加上{c}是多少？", "-": f"再减去{c}呢？", "*": f"再乘以{c}呢？"}}[lang][op]
    intro = f"The last result was {previous}." if lang == "en" else f"上一步的结果是{previous}。"
    outro = "The result is {r}." if lang == "en" else "结果是{r}。"
    return question, one_step(lang, question, x, op, c, intro, outro)


def mix_lines(rng, pool):
    """Single and two-turn chats, each user turn switched by " /think" or " /no think" (about half each)."""
    while True:
        lang, kind = random_lang(rng), rng.random()
        first = pool.take() if kind < 0.45 else qa_self(rng, lang) if kind < 0.5 else \
            qa_greeting(rng, lang) if kind < 0.53 else knowledge_qa(rng, lang)
        lang = first.lang if isinstance(first, Problem) else lang
        turns = [(first.question, first)]
        if rng.random() < 0.2:  # two user turns
            if isinstance(first, Problem):
                turns.append(follow_up(rng, lang, first.answer))
            else:
                second = knowledge_qa(rng, lang)
                turns.append((second.question, second))
        messages = [SYSTEM]
        for question, item in turns:
            thinking = rng.random() < 0.5
            messages += [user(question + (THINK_SUFFIX if thinking else NO_THINK_SUFFIX)), reply(item, thinking)]
        yield first.question, {"messages": messages}


def wrong_number(rng, answer: str) -> str:
    x = Fraction(answer)
    while True:
        wrong = x + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        if wrong >= 0:
            return fmt(wrong)


def dpo_lines(rng, pool):
    """No-think preference pairs; the rejected reply is a wrong result, rude, off topic or cut off."""
    while True:
        kind = rng.random()
        if kind < 0.4:
            item = pool.take()
            lang, chosen, wrong = item.lang, item.direct_answer(), wrong_number(rng, item.answer)
            if rng.random() < 0.5:  # the working is right but the final answer does not follow from it
                cut = chosen.rindex(item.answer)
                rejected = chosen[:cut] + wrong + chosen[cut + len(item.answer):]
            elif lang == "en":
                rejected = rng.choice([f"Maybe {wrong}?", f"I guess it is about {wrong}.", f"Probably {wrong}."])
            else:
                rejected = rng.choice([f"大概是{wrong}吧。", f"我猜是{wrong}。", f"差不多{wrong}吧。"])
        else:
            lang = random_lang(rng)
            item = qa_self(rng, lang) if rng.random() < 0.1 else knowledge_qa(rng, lang)
            chosen = item.answer
            if kind < 0.6:
                rejected = rng.choice(RUDE_REPLIES[lang])
            elif kind < 0.8:
                other = knowledge_qa(rng, lang)
                while other.answer == chosen:
                    other = knowledge_qa(rng, lang)
                rejected = join_sentences([rng.choice(OFF_TOPIC_LEADS[lang]), other.answer], lang)
            else:
                rejected = chosen[: max(2, int(len(chosen) * rng.uniform(0.3, 0.6)))].rstrip()
        prompt = [SYSTEM]
        if rng.random() < 0.1:  # an earlier exchange in the prompt
            earlier = knowledge_qa(rng, lang)
            prompt += [user(earlier.question + NO_THINK_SUFFIX), reply(earlier, thinking=False)]
        prompt.append(user(item.question + NO_THINK_SUFFIX))
        yield item.question, {"chosen": prompt + [assistant(chosen)], "rejected": prompt + [assistant(rejected)]}


LINES = {"pretrain": pretrain_lines, "cot": cot_lines, "grpo": grpo_lines, "mix": mix_lines, "dpo": dpo_lines}


def split_of(key: str) -> str:
    """About 1 in EVAL_EVERY keys is held out, decided by a stable hash of the key."""
    return "eval" if zlib.crc32(key.encode("utf-8")) % EVAL_EVERY == 0 else "train"


def build() -> dict[str, list[dict]]:
    """All files' lines. Each file has its own random stream; arithmetic questions come from one shared pool, in
    this file order, so no question appears twice anywhere."""
    pool = ProblemPool(f"{SEED}-problems")
    files = {}
    for name, lines in LINES.items():
        kept, seen = [], set()
        for key, line in lines(random.Random(f"{SEED}-{name}"), pool):
            text = json.dumps(line, ensure_ascii=False, sort_keys=True)
            if text in seen:  # templated facts repeat; keep every line distinct
                continue
            seen.add(text)
            kept.append({**line, "split": split_of(key)})
            if len(kept) == COUNTS[name]:
                break
        files[name] = kept
    return files


def write(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in build().items():
        path = out_dir / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
        print(f"{path}: {len(lines)} lines, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output directory")
    write(parser.parse_args().out)
