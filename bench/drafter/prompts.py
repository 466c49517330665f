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
