"""The drafter study's prompts: training prompts (the `data` stage generates SmolLM2's own greedy continuations of
them) and three held-out measurement sets of 8 (never trained on). Chat prompts go through SmolLM2's chat template;
corpus-style and structured prompts are plain text."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------------------
# Training: instructions (chat template) and corpus-style openings (plain text). None of them is a held-out prompt.

TRAIN_CHAT = (
    "Explain why the sky is blue.",
    "Write a short poem about autumn leaves.",
    "What are three tips for staying focused while studying?",
    "Describe how a bicycle works.",
    "Give me a simple recipe for pancakes.",
    "What is photosynthesis?",
    "Summarise the plot of a detective story in three sentences.",
    "How do I make a cup of tea?",
    "List five animals that live in the ocean.",
    "What is the difference between weather and climate?",
    "Write a friendly email inviting a colleague to lunch.",
    "Explain what a computer program is to a child.",
    "Why do we have seasons?",
    "Suggest a name for a small bakery and explain it.",
    "What should I pack for a weekend camping trip?",
    "Write a Python function that adds two numbers.",
    "How does a rainbow form?",
    "Tell me a short story about a lost dog who finds its way home.",
    "What are the benefits of regular exercise?",
    "Explain gravity in simple words.",
    "Write a list of steps to plant a tree.",
    "What is the capital of Italy, and what is it known for?",
    "How can I save money on groceries?",
    "Describe a sunset over the mountains.",
    "What does a librarian do?",
    "Write a haiku about the sea.",
    "Explain how vaccines help the body.",
    "What are the primary colours?",
    "Give three reasons to learn a second language.",
    "How do bees make honey?",
    "Write a thank-you note to a teacher.",
    "What is the water cycle?",
)

TRAIN_CORPUS = (
    "And the LORD spake unto Moses, saying,",
    "In the beginning was the Word,",
    "And it came to pass in those days, that",
    "Thus saith the LORD of hosts;",
    "Hear, O Israel:",
    "And Jesus answered and said unto them,",
    "Now the serpent was more subtil than any beast of the field",
    "My son, hear the instruction of thy father,",
    "KING HENRY. Once more unto the breach,",
    "ROMEO. But soft! what light through yonder window breaks?",
    "MACBETH. Is this a dagger which I see before me,",
    "Enter the KING and QUEEN, with attendants.",
    "OTHELLO. It is the cause, it is the cause, my soul.",
    "JULIET. O Romeo, Romeo! wherefore art thou Romeo?",
    "FIRST CITIZEN. Before we proceed any further, hear me speak.",
    "PROSPERO. Now does my project gather to a head;",
    "And David said unto Saul,",
    "Blessed is the man that walketh not",
    "The heavens declare the glory of God;",
    "And he opened his mouth, and taught them, saying,",
    "KING LEAR. Blow, winds, and crack your cheeks!",
    "Enter HAMLET, reading.",
    "PORTIA. Tarry a little; there is something else.",
    "And the angel said unto her,",
)

# Appended after the first slice (the `data` stage appends their lines to data.jsonl after the prompts above):
# more instructions, structured plain text (absent from the first 56) and corpus openings. `(kind, text)`.
TRAIN_EXTRA = tuple(
    [("chat", t) for t in (
        "What is the tallest mountain in the world?",
        "Explain how vaccines work.",
        "Write a haiku about the ocean.",
        "Give three reasons to keep a diary.",
        "How do airplanes stay in the air?",
        "What is the difference between a virus and a bacterium?",
        "Describe a sunset to someone who has never seen one.",
        "Write a short motivational message for a student before an exam.",
        "What are the main parts of a plant?",
        "Explain what the internet is in two sentences.",
        "How can I waste less food at home?",
        "Write a limerick about a cat.",
        "What causes earthquakes?",
        "Give me a packing list for a beach holiday.",
        "Explain the rules of chess briefly.",
        "What is a healthy breakfast?",
        "Describe the life cycle of a butterfly.",
        "Write a short dialogue between a customer and a waiter.",
        "Why is sleep important?",
        "Explain what electricity is.",
        "How do I plant a tree?",
        "What are the planets of the solar system?",
        "Write a birthday message for a friend.",
        "Explain how a refrigerator keeps food cold.",
        "What is the meaning of the word 'empathy'?",
        "Give me tips for writing a good essay.",
        "How do fish breathe underwater?",
        "Describe your ideal weekend.",
        "What is recycling and why does it matter?",
        "Explain how to change a flat tyre.",
        "Write a two-line poem about the moon.",
        "What is the speed of light?",
        "How do I start learning to code?",
        "Explain the difference between a lake and a sea.",
        "Give three ideas for a rainy day at home.",
        "What does a doctor do?",
        "Describe the taste of chocolate.",
        "How are clouds formed?",
        "Write a short apology note for being late.",
        "What is democracy?",
    )]
    + [("structured", t) for t in (
        "1. Red\n2. Orange\n3. Yellow\n4.",
        "January, February, March, April,",
        "def add(a, b):\n    return a + b\n\ndef subtract(a, b):\n",
        "while x < 10:\n    x += 1\n    print(",
        "| City | Country |\n|------|---------|\n| Paris | France |\n| Rome |",
        "<ol>\n  <li>First</li>\n  <li>Second</li>\n  <li>",
        "1, 2, 3, 4, 5, 6, 7,",
        '{"id": 1, "title": "Milk", "done": false},\n{"id": 2,',
        "Step 1: Boil water.\nStep 2: Add pasta.\nStep 3:",
        "import os\nimport sys\n\n\ndef main():\n",
        "- eggs\n- flour\n- sugar\n-",
        "class Point:\n    def __init__(self, x, y):\n",
        "Name: John\nAge: 25\nCity: London\n\nName: Mary\nAge:",
        "SELECT name, age FROM users WHERE",
        "a) cat\nb) dog\nc) bird\nd)",
        "Q: What is 2 + 2?\nA: 4\nQ: What is 3 + 5?\nA:",
    )]
    + [("corpus", t) for t in (
        "And God said, Let there be light:",
        "The LORD is my shepherd;",
        "HAMLET. To be, or not to be, that is the question:",
        "And there were in the same country shepherds",
        "PUCK. If we shadows have offended,",
        "Vanity of vanities, saith the Preacher,",
        "BRUTUS. Romans, countrymen, and lovers!",
        "For God so loved the world,",
    )]
)  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------------
# Held out: measurement only (8 per kind).

HELDOUT = {
    "corpus": (
        "A soft answer turneth away wrath:",
        "Ask, and it shall be given you; seek,",
        "And when the sabbath was past, Mary Magdalene,",
        "Charity suffereth long, and is kind;",
        "SHYLOCK. Signior Antonio, many a time and oft",
        "BASSANIO. In my school-days, when I had lost one shaft,",
        "Enter ANTONIO, SALARINO, and SALANIO.",
        "VIOLA. What country, friends, is this?",
    ),
    "chat": (
        "Once upon a time, in a small village by the sea,",
        "The history of the Roman Empire",
        "A recipe for bread: first,",
        "The capital of France is",
        "What is the best way to learn to play the piano?",
        "Explain how the moon affects the tides.",
        "Write a short story about a robot who learns to paint.",
        "Give me advice for my first job interview.",
    ),
    "structured": (
        "1. Apples\n2. Bananas\n3. Cherries\n4.",
        "Monday: swim\nTuesday: run\nWednesday: rest\nThursday:",
        "def fibonacci(n):\n    if n < 2:\n        return n\n",
        "for i in range(10):\n    print(i)\nfor j in range(",
        "| Name | Age |\n|------|-----|\n| Alice | 30 |\n| Bob |",
        "<ul>\n  <li>Home</li>\n  <li>About</li>\n  <li>",
        "A, B, C, D, E, F, G, H, I,",
        '{"name": "Alice", "age": 30, "city": "Paris"},\n{"name": "Bob",',
    ),
}

#: Which held-out kinds go through the chat template (the others are plain text).
CHAT_KINDS = frozenset({"chat"})
