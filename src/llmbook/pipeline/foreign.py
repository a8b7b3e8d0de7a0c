"""Foreign-language sample text for the dirty corpus: a few hundred words per language.

A web crawl is written in many languages and scripts, and a pipeline for an
English model keeps the pages its language identifier calls English (FineWeb
with fastText, C4 with langdetect). To measure a language filter, the book's
dirty corpus needs pages in other languages, and the book's data has none, so
they live here: sentences in the manner of the opening articles of the
Universal Declaration of Human Rights (United Nations, 1948), written down for
this book rather than copied from the official translations (what matters
here is only which language each sentence is in), in French, German, Spanish
(Latin script, close to English in letters, the hard case for a character
n-gram model) and Greek, Russian and Chinese (other scripts, the easy case).
The corpus recombines these sentences into new pages, so two foreign pages
share sentences but rarely a long run of them.
"""

from __future__ import annotations

import re

UDHR: dict[str, str] = {
    "fr": (
        "Considérant que la reconnaissance de la dignité inhérente à tous les membres de la famille humaine et de "
        "leurs droits égaux et inaliénables constitue le fondement de la liberté, de la justice et de la paix dans "
        "le monde. "
        "Considérant que la méconnaissance et le mépris des droits de l'homme ont conduit à des actes de barbarie "
        "qui révoltent la conscience de l'humanité. "
        "Tous les êtres humains naissent libres et égaux en dignité et en droits. "
        "Ils sont doués de raison et de conscience et doivent agir les uns envers les autres dans un esprit de "
        "fraternité. "
        "Chacun peut se prévaloir de tous les droits et de toutes les libertés proclamés dans la présente "
        "Déclaration, sans distinction aucune, notamment de race, de couleur, de sexe, de langue, de religion, "
        "d'opinion politique ou de toute autre opinion, d'origine nationale ou sociale, de fortune, de naissance "
        "ou de toute autre situation. "
        "Tout individu a droit à la vie, à la liberté et à la sûreté de sa personne. "
        "Nul ne sera tenu en esclavage ni en servitude; l'esclavage et la traite des esclaves sont interdits sous "
        "toutes leurs formes. "
        "Nul ne sera soumis à la torture, ni à des peines ou traitements cruels, inhumains ou dégradants. "
        "Chacun a le droit à la reconnaissance en tous lieux de sa personnalité juridique. "
        "Tous sont égaux devant la loi et ont droit sans distinction à une égale protection de la loi. "
        "Toute personne a droit à un recours effectif devant les juridictions nationales compétentes contre les "
        "actes violant les droits fondamentaux qui lui sont reconnus par la constitution ou par la loi. "
        "Nul ne peut être arbitrairement arrêté, détenu ni exilé. "
        "Toute personne a droit, en pleine égalité, à ce que sa cause soit entendue équitablement et publiquement "
        "par un tribunal indépendant et impartial. "
        "Nul ne sera l'objet d'immixtions arbitraires dans sa vie privée, sa famille, son domicile ou sa "
        "correspondance, ni d'atteintes à son honneur et à sa réputation. "
        "Toute personne a le droit de circuler librement et de choisir sa résidence à l'intérieur d'un État. "
        "Toute personne a droit à la liberté de pensée, de conscience et de religion. "
        "Tout individu a droit à la liberté d'opinion et d'expression, ce qui implique le droit de ne pas être "
        "inquiété pour ses opinions. "
        "Toute personne a droit à l'éducation, et l'éducation doit être gratuite, au moins en ce qui concerne "
        "l'enseignement élémentaire et fondamental."
    ),
    "de": (
        "Da die Anerkennung der angeborenen Würde und der gleichen und unveräußerlichen Rechte aller Mitglieder "
        "der Gemeinschaft der Menschen die Grundlage von Freiheit, Gerechtigkeit und Frieden in der Welt bildet. "
        "Da die Nichtanerkennung und Verachtung der Menschenrechte zu Akten der Barbarei geführt haben, die das "
        "Gewissen der Menschheit mit Empörung erfüllen. "
        "Alle Menschen sind frei und gleich an Würde und Rechten geboren. "
        "Sie sind mit Vernunft und Gewissen begabt und sollen einander im Geist der Brüderlichkeit begegnen. "
        "Jeder hat Anspruch auf alle in dieser Erklärung verkündeten Rechte und Freiheiten, ohne irgendeinen "
        "Unterschied, etwa nach Rasse, Hautfarbe, Geschlecht, Sprache, Religion, politischer oder sonstiger "
        "Überzeugung, nationaler oder sozialer Herkunft, Vermögen, Geburt oder sonstigem Stand. "
        "Jeder hat das Recht auf Leben, Freiheit und Sicherheit der Person. "
        "Niemand darf in Sklaverei oder Leibeigenschaft gehalten werden; Sklaverei und Sklavenhandel sind in allen "
        "ihren Formen verboten. "
        "Niemand darf der Folter oder grausamer, unmenschlicher oder erniedrigender Behandlung oder Strafe "
        "unterworfen werden. "
        "Jeder hat das Recht, überall als rechtsfähig anerkannt zu werden. "
        "Alle Menschen sind vor dem Gesetz gleich und haben ohne Unterschied Anspruch auf gleichen Schutz durch "
        "das Gesetz. "
        "Jeder hat Anspruch auf einen wirksamen Rechtsbehelf bei den zuständigen innerstaatlichen Gerichten gegen "
        "Handlungen, durch die seine ihm nach der Verfassung oder nach dem Gesetz zustehenden Grundrechte verletzt "
        "werden. "
        "Niemand darf willkürlich festgenommen, in Haft gehalten oder des Landes verwiesen werden. "
        "Jeder hat bei der Feststellung seiner Rechte und Pflichten in voller Gleichheit Anspruch auf ein "
        "gerechtes und öffentliches Verfahren vor einem unabhängigen und unparteiischen Gericht. "
        "Niemand darf willkürlichen Eingriffen in sein Privatleben, seine Familie, seine Wohnung und seinen "
        "Schriftverkehr oder Beeinträchtigungen seiner Ehre und seines Rufes ausgesetzt werden. "
        "Jeder hat das Recht, sich innerhalb eines Staates frei zu bewegen und seinen Aufenthaltsort frei zu "
        "wählen. "
        "Jeder hat das Recht auf Gedanken-, Gewissens- und Religionsfreiheit. "
        "Jeder hat das Recht auf Meinungsfreiheit und freie Meinungsäußerung. "
        "Jeder hat das Recht auf Bildung, und die Bildung ist unentgeltlich, zum mindesten der Grundschulunterricht "
        "und die grundlegende Bildung."
    ),
    "es": (
        "Considerando que la libertad, la justicia y la paz en el mundo tienen por base el reconocimiento de la "
        "dignidad intrínseca y de los derechos iguales e inalienables de todos los miembros de la familia humana. "
        "Considerando que el desconocimiento y el menosprecio de los derechos humanos han originado actos de "
        "barbarie ultrajantes para la conciencia de la humanidad. "
        "Todos los seres humanos nacen libres e iguales en dignidad y derechos y, dotados como están de razón y "
        "conciencia, deben comportarse fraternalmente los unos con los otros. "
        "Toda persona tiene todos los derechos y libertades proclamados en esta Declaración, sin distinción "
        "alguna de raza, color, sexo, idioma, religión, opinión política o de cualquier otra índole, origen "
        "nacional o social, posición económica, nacimiento o cualquier otra condición. "
        "Todo individuo tiene derecho a la vida, a la libertad y a la seguridad de su persona. "
        "Nadie estará sometido a esclavitud ni a servidumbre; la esclavitud y la trata de esclavos están "
        "prohibidas en todas sus formas. "
        "Nadie será sometido a torturas ni a penas o tratos crueles, inhumanos o degradantes. "
        "Todo ser humano tiene derecho, en todas partes, al reconocimiento de su personalidad jurídica. "
        "Todos son iguales ante la ley y tienen, sin distinción, derecho a igual protección de la ley. "
        "Toda persona tiene derecho a un recurso efectivo ante los tribunales nacionales competentes, que la "
        "ampare contra actos que violen sus derechos fundamentales reconocidos por la constitución o por la ley. "
        "Nadie podrá ser arbitrariamente detenido, preso ni desterrado. "
        "Toda persona tiene derecho, en condiciones de plena igualdad, a ser oída públicamente y con justicia "
        "por un tribunal independiente e imparcial. "
        "Nadie será objeto de injerencias arbitrarias en su vida privada, su familia, su domicilio o su "
        "correspondencia, ni de ataques a su honra o a su reputación. "
        "Toda persona tiene derecho a circular libremente y a elegir su residencia en el territorio de un Estado. "
        "Toda persona tiene derecho a la libertad de pensamiento, de conciencia y de religión. "
        "Todo individuo tiene derecho a la libertad de opinión y de expresión. "
        "Toda persona tiene derecho a la educación, y la educación debe ser gratuita, al menos en lo concerniente "
        "a la instrucción elemental y fundamental."
    ),
    "el": (
        "Επειδή η αναγνώριση της αξιοπρέπειας, που είναι σύμφυτη σε όλα τα μέλη της ανθρώπινης οικογένειας, "
        "καθώς και των ίσων και αναπαλλοτρίωτων δικαιωμάτων τους, αποτελεί το θεμέλιο της ελευθερίας, της "
        "δικαιοσύνης και της ειρήνης στον κόσμο. "
        "Επειδή η παραγνώριση και η περιφρόνηση των δικαιωμάτων του ανθρώπου οδήγησαν σε πράξεις βαρβαρότητας, "
        "που εξεγείρουν την ανθρώπινη συνείδηση. "
        "Όλοι οι άνθρωποι γεννιούνται ελεύθεροι και ίσοι στην αξιοπρέπεια και τα δικαιώματα. "
        "Είναι προικισμένοι με λογική και συνείδηση, και οφείλουν να συμπεριφέρονται μεταξύ τους με πνεύμα "
        "αδελφοσύνης. "
        "Κάθε άνθρωπος δικαιούται να επικαλείται όλα τα δικαιώματα και όλες τις ελευθερίες που προκηρύσσει η "
        "παρούσα Διακήρυξη, χωρίς καμία απολύτως διάκριση, ειδικότερα ως προς τη φυλή, το χρώμα, το φύλο, τη "
        "γλώσσα, τις θρησκείες, τις πολιτικές ή οποιεσδήποτε άλλες πεποιθήσεις. "
        "Κάθε άτομο έχει δικαίωμα στη ζωή, την ελευθερία και την προσωπική του ασφάλεια. "
        "Κανείς δεν μπορεί να κρατηθεί σε δουλεία ή σε καθεστώς υποτέλειας· η δουλεία και το δουλεμπόριο με "
        "οποιαδήποτε μορφή απαγορεύονται. "
        "Κανείς δεν επιτρέπεται να υποβληθεί σε βασανιστήρια ούτε σε ποινή ή μεταχείριση σκληρή, απάνθρωπη ή "
        "εξευτελιστική. "
        "Καθένας, όπου κι αν βρίσκεται, έχει δικαίωμα να αναγνωρίζεται η νομική του προσωπικότητα. "
        "Όλοι είναι ίσοι απέναντι στο νόμο και έχουν δικαίωμα σε ίση προστασία του νόμου, χωρίς καμία απολύτως "
        "διάκριση. "
        "Κανείς δεν μπορεί να συλληφθεί, να κρατηθεί ή να εξοριστεί αυθαίρετα. "
        "Καθένας έχει δικαίωμα, με πλήρη ισότητα, να δικαστεί η υπόθεσή του δίκαια και δημόσια από ανεξάρτητο "
        "και αμερόληπτο δικαστήριο. "
        "Κανείς δεν επιτρέπεται να υποστεί αυθαίρετες επεμβάσεις στην ιδιωτική του ζωή, την οικογένεια, την "
        "κατοικία ή την αλληλογραφία του. "
        "Κάθε άτομο έχει το δικαίωμα να κυκλοφορεί ελεύθερα και να εκλέγει τον τόπο της διαμονής του στο "
        "εσωτερικό ενός κράτους. "
        "Κάθε άτομο έχει δικαίωμα στην ελευθερία της σκέψης, της συνείδησης και της θρησκείας. "
        "Καθένας έχει το δικαίωμα της ελευθερίας της γνώμης και της έκφρασης. "
        "Κάθε πρόσωπο έχει δικαίωμα στην εκπαίδευση, και η εκπαίδευση πρέπει να παρέχεται δωρεάν, τουλάχιστον "
        "στη στοιχειώδη και βασική βαθμίδα."
    ),
    "ru": (
        "Принимая во внимание, что признание достоинства, присущего всем членам человеческой семьи, и равных и "
        "неотъемлемых прав их является основой свободы, справедливости и всеобщего мира. "
        "Принимая во внимание, что пренебрежение и презрение к правам человека привели к варварским актам, "
        "которые возмущают совесть человечества. "
        "Все люди рождаются свободными и равными в своем достоинстве и правах. "
        "Они наделены разумом и совестью и должны поступать в отношении друг друга в духе братства. "
        "Каждый человек должен обладать всеми правами и всеми свободами, провозглашенными настоящей Декларацией, "
        "без какого бы то ни было различия, как-то в отношении расы, цвета кожи, пола, языка, религии, "
        "политических или иных убеждений, национального или социального происхождения, имущественного, "
        "сословного или иного положения. "
        "Каждый человек имеет право на жизнь, на свободу и на личную неприкосновенность. "
        "Никто не должен содержаться в рабстве или в подневольном состоянии; рабство и работорговля запрещаются "
        "во всех их видах. "
        "Никто не должен подвергаться пыткам или жестоким, бесчеловечным или унижающим его достоинство "
        "обращению и наказанию. "
        "Каждый человек, где бы он ни находился, имеет право на признание его правосубъектности. "
        "Все люди равны перед законом и имеют право, без всякого различия, на равную защиту закона. "
        "Каждый человек имеет право на эффективное восстановление в правах компетентными национальными судами "
        "в случаях нарушения его основных прав, предоставленных ему конституцией или законом. "
        "Никто не может быть подвергнут произвольному аресту, задержанию или изгнанию. "
        "Каждый человек, для определения его прав и обязанностей, имеет право, на основе полного равенства, на "
        "то, чтобы его дело было рассмотрено гласно и с соблюдением всех требований справедливости независимым "
        "и беспристрастным судом. "
        "Никто не может подвергаться произвольному вмешательству в его личную и семейную жизнь, произвольным "
        "посягательствам на неприкосновенность его жилища, тайну его корреспонденции или на его честь и "
        "репутацию. "
        "Каждый человек имеет право свободно передвигаться и выбирать себе местожительство в пределах каждого "
        "государства. "
        "Каждый человек имеет право на свободу мысли, совести и религии. "
        "Каждый человек имеет право на свободу убеждений и на свободное выражение их. "
        "Каждый человек имеет право на образование, и образование должно быть бесплатным по меньшей мере в "
        "том, что касается начального и общего образования."
    ),
    "zh": (
        "鉴于对人类家庭所有成员的固有尊严及其平等的和不移的权利的承认，乃是世界自由、正义与和平的基础。"
        "鉴于对人权的无视和侮蔑已发展为野蛮暴行，这些暴行玷污了人类的良心。"
        "人人生而自由，在尊严和权利上一律平等。"
        "他们赋有理性和良心，并应以兄弟关系的精神相对待。"
        "人人有资格享有本宣言所载的一切权利和自由，不分种族、肤色、性别、语言、宗教、政治或其他见解、"
        "国籍或社会出身、财产、出生或其他身分等任何区别。"
        "人人有权享有生命、自由和人身安全。"
        "任何人不得使为奴隶或奴役；一切形式的奴隶制度和奴隶买卖，均应予以禁止。"
        "任何人不得加以酷刑，或施以残忍的、不人道的或侮辱性的待遇或刑罚。"
        "人人在任何地方有权被承认在法律前的人格。"
        "法律之前人人平等，并有权享受法律的平等保护，不受任何歧视。"
        "任何人当宪法或法律所赋予他的基本权利遭受侵害时，有权由合格的国家法庭对这种侵害行为作有效的补救。"
        "任何人不得加以任意逮捕、拘禁或放逐。"
        "人人完全平等地有权由一个独立而无偏倚的法庭进行公正的和公开的审讯，以确定他的权利和义务。"
        "任何人的私生活、家庭、住宅和通信不得任意干涉，他的荣誉和名誉不得加以攻击。"
        "人人在各国境内有权自由迁徙和居住。"
        "人人有思想、良心和宗教自由的权利。"
        "人人有权享有主张和发表意见的自由。"
        "人人都有受教育的权利，教育应当免费，至少在初级和基本阶段应如此。"
    ),
}

LANGUAGES: tuple[str, ...] = tuple(UDHR)

_SENTENCE_END = re.compile(r"(?<=[.;!?])\s+|(?<=[。；])")


def sentences(lang: str) -> list[str]:
    """The sample's sentences in language ``lang`` (ISO 639-1), split at sentence ends (。 for Chinese)."""
    if lang not in UDHR:
        raise ValueError(f"no foreign sample text for language {lang!r}; choose one of {', '.join(LANGUAGES)}")
    return [s.strip() for s in _SENTENCE_END.split(UDHR[lang]) if s.strip()]
