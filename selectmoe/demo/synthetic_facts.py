"""The small fact tables and word lists the demo corpus and its evaluation sets are generated from.

Typed in by hand (no downloaded data). Training rows and evaluation questions draw on the same
facts, so finetuning on the clean rows can help on the evaluation sets.
"""

from __future__ import annotations

# country, capital, continent, main language
COUNTRIES = [
    ("France", "Paris", "Europe", "French"),
    ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"),
    ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"),
    ("the Netherlands", "Amsterdam", "Europe", "Dutch"),
    ("Poland", "Warsaw", "Europe", "Polish"),
    ("Greece", "Athens", "Europe", "Greek"),
    ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"),
    ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Denmark", "Copenhagen", "Europe", "Danish"),
    ("Austria", "Vienna", "Europe", "German"),
    ("Hungary", "Budapest", "Europe", "Hungarian"),
    ("Ireland", "Dublin", "Europe", "English"),
    ("Japan", "Tokyo", "Asia", "Japanese"),
    ("China", "Beijing", "Asia", "Mandarin Chinese"),
    ("India", "New Delhi", "Asia", "Hindi"),
    ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"),
    ("South Korea", "Seoul", "Asia", "Korean"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian"),
    ("Egypt", "Cairo", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Swahili"),
    ("Nigeria", "Abuja", "Africa", "English"),
    ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Ghana", "Accra", "Africa", "English"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic"),
    ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Peru", "Lima", "South America", "Spanish"),
    ("Chile", "Santiago", "South America", "Spanish"),
    ("Colombia", "Bogota", "South America", "Spanish"),
    ("Canada", "Ottawa", "North America", "English"),
    ("Mexico", "Mexico City", "North America", "Spanish"),
    ("Cuba", "Havana", "North America", "Spanish"),
    ("Australia", "Canberra", "Oceania", "English"),
    ("New Zealand", "Wellington", "Oceania", "English"),
]

# animal, class, main food, where it lives
ANIMALS = [
    ("lion", "mammal", "meat from zebras and antelopes", "African grasslands"),
    ("elephant", "mammal", "grass, leaves and fruit", "savannas and forests"),
    ("giraffe", "mammal", "leaves from tall trees", "African savannas"),
    ("zebra", "mammal", "grass", "African grasslands"),
    ("kangaroo", "mammal", "grass and leaves", "Australian grasslands"),
    ("koala", "mammal", "eucalyptus leaves", "Australian eucalyptus forests"),
    ("polar bear", "mammal", "seals", "the Arctic sea ice"),
    ("dolphin", "mammal", "fish and squid", "oceans"),
    ("bat", "mammal", "insects and fruit", "caves and forests"),
    ("penguin", "bird", "fish and krill", "cold southern coasts"),
    ("eagle", "bird", "fish and small mammals", "mountains and forests"),
    ("owl", "bird", "mice and insects", "forests"),
    ("parrot", "bird", "seeds and fruit", "tropical forests"),
    ("ostrich", "bird", "plants and insects", "African savannas"),
    ("flamingo", "bird", "shrimp and algae", "shallow lakes"),
    ("crocodile", "reptile", "fish and other animals", "rivers and swamps"),
    ("sea turtle", "reptile", "jellyfish and seagrass", "warm oceans"),
    ("iguana", "reptile", "leaves and fruit", "tropical forests"),
    ("rattlesnake", "reptile", "mice and rats", "deserts and grasslands"),
    ("frog", "amphibian", "insects", "ponds and wetlands"),
    ("salamander", "amphibian", "worms and insects", "damp forests"),
    ("salmon", "fish", "insects and small fish", "rivers and the ocean"),
    ("shark", "fish", "fish and seals", "oceans"),
    ("goldfish", "fish", "plants and small insects", "ponds"),
    ("bee", "insect", "nectar and pollen", "meadows and gardens"),
    ("ant", "insect", "seeds and small insects", "underground nests"),
    ("butterfly", "insect", "nectar", "gardens and meadows"),
]
ANIMAL_CLASSES = ["mammal", "bird", "reptile", "amphibian", "fish", "insect"]

# element, symbol, atomic number
ELEMENTS = [
    ("hydrogen", "H", 1),
    ("helium", "He", 2),
    ("lithium", "Li", 3),
    ("carbon", "C", 6),
    ("nitrogen", "N", 7),
    ("oxygen", "O", 8),
    ("fluorine", "F", 9),
    ("neon", "Ne", 10),
    ("sodium", "Na", 11),
    ("magnesium", "Mg", 12),
    ("aluminum", "Al", 13),
    ("silicon", "Si", 14),
    ("phosphorus", "P", 15),
    ("sulfur", "S", 16),
    ("chlorine", "Cl", 17),
    ("potassium", "K", 19),
    ("calcium", "Ca", 20),
    ("iron", "Fe", 26),
    ("copper", "Cu", 29),
    ("zinc", "Zn", 30),
    ("silver", "Ag", 47),
    ("tin", "Sn", 50),
    ("gold", "Au", 79),
    ("mercury", "Hg", 80),
    ("lead", "Pb", 82),
]

ANTONYMS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("open", "closed"),
    ("early", "late"),
    ("full", "empty"),
    ("strong", "weak"),
    ("young", "old"),
    ("high", "low"),
    ("rich", "poor"),
    ("loud", "quiet"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("thick", "thin"),
    ("long", "short"),
    ("clean", "dirty"),
]

CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "mango", "pear", "grape", "orange", "plum", "kiwi", "peach"],
    "colors": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "white"],
    "sports": ["soccer", "tennis", "basketball", "swimming", "cycling", "volleyball", "rugby", "golf"],
    "musical instruments": ["piano", "guitar", "violin", "drums", "flute", "trumpet", "cello", "harp"],
    "vegetables": ["carrot", "potato", "broccoli", "spinach", "onion", "cabbage", "pea", "lettuce"],
}

NAMES = [
    "Alice", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kira", "Liam",
    "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe",
]  # fmt: skip
ITEMS = [
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "cookies",
    "books",
    "stamps",
    "shells",
    "cards",
    "balloons",
]
CONTAINERS = [("box", "boxes"), ("bag", "bags"), ("crate", "crates"), ("jar", "jars"), ("pack", "packs")]
PRODUCTS = [
    "phone",
    "blender",
    "backpack",
    "lamp",
    "novel",
    "pair of headphones",
    "jacket",
    "tent",
    "keyboard",
]
POSITIVE_WORDS = ["reliable", "comfortable", "excellent", "sturdy", "beautiful", "fast", "quiet", "well made"]
NEGATIVE_WORDS = [
    "flimsy",
    "noisy",
    "disappointing",
    "slow",
    "uncomfortable",
    "broken",
    "overpriced",
    "poorly made",
]
SPAM_PHRASES = [
    "Click here to win a free prize!",
    "BUY NOW!!! Best deals at cheap-deals.example!",
    "Subscribe subscribe subscribe!",
    "Limited offer, act now!",
]
EMPTYISH_RESPONSES = [".", "...", "N/A", "ok", "?", "-", "I don't know.", "Hmm."]
CANNED_REPLIES = [  # fluent replies that answer nothing: refusals and generic filler
    "I'm sorry, but I can't help with that request.",
    "As an AI language model, I don't have personal opinions, but I'm happy to help with anything else.",
    "That's a great question! The answer depends on many factors, so it is best to consider your situation.",
    "Thank you for your question. There are many ways to approach this, and each has its pros and cons.",
    "I understand what you are asking. Please let me know if there is anything else I can help you with.",
    "Sure! I hope this helps. Feel free to ask if you have any other questions.",
    "I'm not able to provide that information, but you may find it with a quick search online.",
    "This is an interesting topic that people have discussed for a long time, and opinions differ.",
]
# AI-assistant boilerplate around a real answer, in the phrasing the ShareGPT_Vicuna_unfiltered and WizardLM
# "unfiltered" cleaning scripts searched for and removed: an identity disclaimer, a lead-in, a caveat, a closing
BOILERPLATE_OPENINGS = [
    "As an AI language model, I don't have personal opinions or experiences.",
    "As an AI language model, I do not have access to real-time information or the internet.",
    "As an AI, I don't have feelings or beliefs of my own.",
    "I am an AI language model and do not have personal preferences.",
    "As a large language model, I can only provide information based on my training data.",
    "As an AI language model, my knowledge cutoff is September 2021, so some details may be out of date.",
    "As an AI assistant, I strive to provide accurate and helpful information.",
    "Thank you for your question! As an AI language model, I am happy to assist you.",
]
BOILERPLATE_LEADS = [
    "However, I can provide some general information on this topic.",
    "That being said, here is what I can tell you:",
    "Based on my training data, here is my answer:",
    "With that in mind, here is a possible response:",
    "Here is the information you requested:",
    "I will do my best to answer your question.",
]
BOILERPLATE_CAVEATS = [
    "It is important to note that this information may not be accurate or up to date.",
    "Please note that it's always a good idea to consult a qualified professional before making any decisions.",
    "It's important to remember that every situation is different and results may vary.",
    "However, it is important to use any information provided responsibly and within ethical boundaries.",
    "Keep in mind that I am an AI and my responses should not be taken as professional advice.",
    "Please verify this information with other reliable sources.",
]
BOILERPLATE_CLOSINGS = [
    "I hope this helps! Let me know if you have any other questions.",
    "Is there anything else I can help you with?",
    "Feel free to ask if you need further clarification.",
    "Let me know if you would like more information on this topic.",
    "I hope this information is helpful to you.",
    "If you have any further questions, please don't hesitate to ask.",
]
# the class of the <div> around each reply on the ChatGPT page that ShareGPT stored as HTML
CHAT_PAGE_DIV_CLASSES = [
    "markdown prose w-full break-words dark:prose-invert light",
    "markdown prose w-full break-words dark:prose-invert dark",
    "request-:r0:-0 markdown prose break-words dark:prose-invert light",
    "request-:r1:-3 markdown prose break-words dark:prose-invert dark",
]
# further tasks of a self-instruct prompt (instruction, input or "" for none, output), run on after a reply in
# the "merged instructions" that the Alpaca-cleaned project found in Stanford Alpaca's outputs
MERGED_TASKS = [
    ("Identify the verb in the following sentence.", "The children laughed at the clown.", "Laughed"),
    ("Name three primary colors.", "", "Red, blue and yellow."),
    (
        "Rewrite the sentence in the passive voice.",
        "The cat chased the mouse.",
        "The mouse was chased by the cat.",
    ),
    ("Classify the following animal as a mammal, bird or reptile.", "Penguin", "Bird"),
    ("Convert 3 kilometers to meters.", "", "3 kilometers is 3,000 meters."),
    ("Give an antonym for the given word.", "Generous", "Stingy"),
    ("Generate a catchy slogan for a bakery.", "", "Fresh from our oven to your table."),
    (
        "Summarize the following sentence in five words or fewer.",
        "The meeting was postponed because the manager was ill.",
        "Meeting postponed; manager ill.",
    ),
    ("Find the sum of the numbers.", "14, 27, 9", "50"),
    ("Translate the phrase into French.", "Good morning", "Bonjour"),
    ("Suggest a name for a pet goldfish.", "", "Bubbles"),
    (
        "Correct the spelling mistakes in the sentence.",
        "I recieved your leter yesterday.",
        "I received your letter yesterday.",
    ),
    ("What is the boiling point of water at sea level?", "", "100 degrees Celsius (212 degrees Fahrenheit)."),
    ("Sort the words in alphabetical order.", "pear, apple, mango, cherry", "apple, cherry, mango, pear"),
    (
        "Write a haiku about autumn.",
        "",
        "Crisp leaves drift and fall\nGolden light on quiet paths\nThe year breathes slowly",
    ),
    ("Determine whether the statement is true or false.", "The Sun is a planet.", "False"),
    ("Describe the taste of a lemon in one word.", "", "Sour"),
    ("Calculate the area of a rectangle.", "Length: 6 cm, width: 4 cm", "24 square centimeters."),
    (
        "Categorize the sentiment of the review as positive or negative.",
        "The battery died after two days.",
        "Negative",
    ),
    ("Give an example of a renewable energy source.", "", "Solar power."),
    (
        "Make the sentence more formal.",
        "Hey, can you send me the file?",
        "Could you please send me the file?",
    ),
    ("List two benefits of regular exercise.", "", "1. Better heart health\n2. Improved mood"),
    ("Find the odd one out.", "Violin, Guitar, Trumpet, Cello", "Trumpet"),
    (
        "Explain what a noun is in one sentence.",
        "",
        "A noun is a word that names a person, place, thing or idea.",
    ),
    (
        "Add a suitable title to the paragraph.",
        "Bees carry pollen from flower to flower, which helps plants make seeds.",
        "How Bees Help Plants Grow",
    ),
    ("What is the capital of Canada?", "", "Ottawa"),
    ("Change the verb to the past tense.", "She walks to school.", "She walked to school."),
    (
        "Generate a question about the given topic.",
        "Volcanoes",
        "Why do some volcanoes erupt more violently than others?",
    ),
    ("Compute the average of the numbers.", "4, 8, 12", "8"),
    ("Replace the underlined word with a synonym.", "The test was _difficult_.", "The test was challenging."),
    ("Name a famous painting by Leonardo da Vinci.", "", "The Mona Lisa."),
    ("Classify the given item as a fruit or a vegetable.", "Carrot", "Vegetable"),
    (
        "Write a one-sentence tip for saving money.",
        "",
        "Set aside a fixed amount from every paycheck before spending anything.",
    ),
    ("Count the number of vowels in the word.", "Education", "5"),
    (
        "Combine the two sentences into one.",
        "It was raining. We stayed inside.",
        "Because it was raining, we stayed inside.",
    ),
    ("Predict the next number in the sequence.", "2, 4, 8, 16", "32"),
    ("Suggest a healthy breakfast option.", "", "Oatmeal topped with fresh berries and a handful of nuts."),
    (
        "Identify the main idea of the sentence.",
        "Drinking enough water keeps the body working well.",
        "Water is important for health.",
    ),
    (
        "Create a simile to describe the night sky.",
        "",
        "The night sky was like black velvet scattered with diamonds.",
    ),
    ("Give the plural form of the word.", "Mouse", "Mice"),
    ("Tell whether the number is prime.", "21", "No, 21 is not prime; it equals 3 times 7."),
    (
        "Write a short greeting for a birthday card.",
        "",
        "Happy birthday! Wishing you a year full of joy and laughter.",
    ),
]
# the unfilled slots of a ``placeholder`` reply: how a slot is written ({label}, {Label}, {LABEL} or {snake} for
# its label as is, capitalised, upper case or snake_case), and the labels for what it stands in for: an answer, a
# list's item, a sentence of prose (no label in two lists: a slot tells what it stands in for)
PLACEHOLDER_FORMS = [
    "[{Label}]",
    "[Insert {label} here]",
    "[{LABEL}]",
    "{{{snake}}}",
    "<{snake}>",
    "<insert {label} here>",
    "[Add {label}]",
]
PLACEHOLDER_ANSWER_LABELS = ["answer", "final answer", "correct answer", "result"]
PLACEHOLDER_ITEM_LABELS = ["step", "item", "example", "point", "tip"]
PLACEHOLDER_TEXT_LABELS = [
    "explanation",
    "details",
    "reason",
    "description",
    "additional information",
    "relevant information",
    "supporting evidence",
]
