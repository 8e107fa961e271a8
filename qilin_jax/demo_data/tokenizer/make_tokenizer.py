"""Train the small demo SentencePiece tokenizer (LLaMA-like settings) and write an HF tokenizer dir.

    python -m qilin_jax.demo_data.tokenizer.make_tokenizer [--out qilin_jax/demo_data/tokenizer] [--vocab-size 4000]

The corpus is built here, deterministically: the paper's Appendix A.1 prompts, the conversation
templates (Vicuna v1, llava_v1, LLaMA-2), PMC-VQA instructions, all text the demo generator
(qilin_jax/demo_data/templates.py) can produce, and general Chinese/English medical sentences below.
Settings follow the LLaMA-2 tokenizer: BPE, byte fallback, split digits, identity
normalisation, dummy prefix, whitespace kept, unk/bos/eos = 0/1/2, no pad. No `<image>` token
is added: like HF llava for LLaMA, the image token id is len(tokenizer).

Why one file (over 450 lines): a standalone script that rebuilds the shipped tokenizer; its
corpus construction and the SentencePiece settings belong together.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import sentencepiece as spm

from qilin_jax.demo_data import templates

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 4000
# Short pieces keep the demo's attributes (location, size, kind, count) in separate tokens.
MAX_PIECE_LEN = 6
# Random demo cases whose text joins the corpus; few, so template combinations stay rare.
N_GENERATED_CASES = 300
# LLaMA-2 used 0.99995; on this small corpus it keeps every character the demo emits.
CHAR_COVERAGE = 0.99995

# --- Paper, Appendix A.1 -------------------------------------------------------------------------
ALIGNMENT_PROMPTS_ZH = [
    "请基于图中的信息，撰写一段相关的描述。",
    "根据图示内容，写一段相关的文本。",
    "根据图中可见，提供一段相关的叙述。",
    "结合图中的细节，写下一段相关的文字。",
    "描述一下图示中的场景，并附上相关的文本。",
    "根据图示，写下一段与其中内容相关的文字。",
    "请根据图中细节，撰写一段相关的描述。",
    "图示呈现了什么，写下一段相关的文本。",
    "基于图中的内容，提供一段相关的叙述。",
    "结合图示，给出一段与其中内容相关的文字描述。",
    "阅读并理解下图，然后撰写一段与图中内容相关的文本。",
    "图中的信息揭示了什么？请撰写一段相关的文本进行解释。",
    "分析图中的信息并提供一段相关的文字描述。",
    "根据图中的内容撰写一段相关的文本。",
    "请根据图中的细节给出一段相关文本。",
    "从图中获取关键信息，并撰写一段相关的文本。",
    "图中给出了怎样的信息，请用一段相关的文字描述出来。",
    "根据图中的元素和组成部分，写一段相关的文本。",
    "请根据图中所呈现的内容写一段相关文字。",
    "根据图中的信息，撰写一段描述性文本。",
    "图中的内容暗示了什么？请撰写一段相关的文字。",
    "图中的内容传达了怎样的信息？请写一段相关的描述性文本。",
]
ALIGNMENT_PROMPTS_EN = [
    "Based on the information in the image, please write a related description.",
    "Based on the content of the illustration, write a related text.",
    "Based on what is seen in the image, provide a related description.",
    "Based on the details in the image, write a related passage.",
    "Describe the scene in the illustration and provide related text.",
    "Based on the illustration, write a passage related to its content.",
    "Please write a description based on the details in the image.",
    "What does the illustration show? Write a related passage.",
    "Based on the content in the image, provide a related description.",
    "Based on the illustration, provide a textual description related to its content.",
    "Read and understand the following image, then write a passage related to the content in the image.",
    "What does the information in the image reveal? Please write a related passage to explain.",
    "Analyze the information in the image and provide a related textual description.",
    "Write a passage based on the content in the image.",
    "Please provide a passage based on the details in the image.",
    "Extract key information from the image and write a related passage.",
    "What information is provided in the image? Please describe it in a related passage.",
    "Based on the elements and components in the image, write a related passage.",
    "Please write a passage based on the content presented in the image.",
    "Based on the information in the image, write a descriptive passage.",
    "What does the content in the image imply? Please write a related passage.",
    "What message does the content in the image convey? Please write a related descriptive passage.",
]
INSTRUCTION_PROMPTS_ZH = [
    "请尽量简洁地回答。",
    "简洁回复即可。",
    "请根据图中内容简洁作答。",
    "请直接说出正确答案。",
    "请直接作答。",
    "请根据图中内容尽量简洁作答。",
    "请尽可能简洁地回复。",
]
INSTRUCTION_PROMPTS_EN = [
    "Please answer as concisely as possible.",
    "A concise reply will suffice.",
    "Please answer concisely based on the content in the image.",
    "Please state the correct answer directly.",
    "Please answer directly.",
    "Please answer as concisely as possible based on the content in the image.",
    "Please reply as concisely as possible.",
]

# --- Conversation templates and evaluation instructions ------------------------------------------
TEMPLATE_LINES = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions.",
    "USER: <image>\n",
    "USER:",
    "ASSISTANT:",
    "HUMAN:",
    "USER: ",
    " ASSISTANT: ",
    "[INST] <<SYS>>\nYou are a helpful language and vision assistant.\n<</SYS>>\n\n",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "Answer with the option's letter from the given choices directly.",
    "请直接回答选项字母。",
    "Question: What is the modality of this image? Choices: A:CT B:MRI C:X-ray D:Ultrasound",
    "Answer: B",
    "A:",
    "B:",
    "C:",
    "D:",
    "A",
    "B",
    "C",
    "D",
]

# --- General medical sentences (data) ------------------------------------------------------------
MEDICAL_ZH = """\
胸部CT平扫显示双肺纹理清晰，未见明显实变影。
右肺上叶可见一磨玻璃结节，边界尚清。
左肺下叶见斑片状高密度影，考虑炎症可能。
肝脏形态大小正常，实质密度均匀，未见异常强化灶。
肝右叶见一类圆形低密度灶，增强扫描未见强化，考虑肝囊肿。
胆囊不大，壁不厚，腔内未见异常密度影。
胰腺形态、大小及密度未见异常。
脾脏不大，密度均匀。
双肾位置、形态正常，未见结石及积水。
膀胱充盈良好，壁光滑。
前列腺体积增大，密度欠均匀。
子宫大小正常，肌层回声均匀。
双侧附件区未见明显异常回声。
甲状腺右叶见一低回声结节，边界清楚，形态规则。
乳腺外上象限可见不规则低回声肿块，边缘毛刺。
颈部淋巴结未见明显肿大。
心影大小正常，主动脉结不宽。
双侧肋膈角锐利，膈面光滑。
气管居中，纵隔未见增宽。
胸腔内未见积液及气胸征象。
脑实质内未见异常信号，脑室系统未见扩大。
左侧基底节区见斑点状长T1长T2信号，考虑腔隙性脑梗死。
右侧额叶见团块状异常信号，周围可见水肿带。
中线结构居中，脑沟脑裂未见增宽。
脊柱生理曲度存在，椎体骨质未见破坏。
腰4/5椎间盘向后突出，硬膜囊受压。
膝关节间隙变窄，关节面骨质增生。
股骨颈骨折，断端轻度移位。
桡骨远端骨折，可见骨折线。
胎儿双顶径与孕周相符，胎心搏动可见。
超声显示肝内胆管未见扩张。
彩色多普勒显示结节内可见点状血流信号。
磁共振弥散加权成像显示局部弥散受限。
增强扫描病灶呈环形强化。
病灶呈分叶状，边缘可见毛刺征。
建议结合临床及进一步检查。
建议三个月后复查。
影像学表现符合肺炎。
考虑良性病变可能性大。
不除外恶性肿瘤，建议穿刺活检。
患者男性，六十五岁，咳嗽咳痰两周。
患者女性，四十二岁，体检发现甲状腺结节。
患者因头痛伴呕吐入院。
患者主诉右上腹疼痛三天。
既往有高血压病史十年。
实验室检查示白细胞计数升高。
血糖、血脂控制尚可。
医生建议进行增强CT检查。
放射科医生负责阅读和解释医学影像。
计算机断层扫描利用X射线获取人体横断面图像。
磁共振成像无电离辐射，软组织对比度高。
超声检查方便快捷，常用于腹部和妇产科。
X线平片是最基础的影像检查方法。
正电子发射断层扫描可以反映组织代谢情况。
病理切片显示癌细胞呈巢状排列。
免疫组化染色显示肿瘤细胞阳性。
显微镜下可见大量炎症细胞浸润。
眼底照相显示视网膜出血。
皮肤镜图像显示色素网络不规则。
内镜下见胃窦部黏膜充血水肿。
结肠镜检查发现一枚息肉，予以切除。
心电图提示窦性心律，心率七十五次每分。
超声心动图显示左心室射血分数正常。
冠状动脉造影显示前降支狭窄。
肺动脉CT血管成像未见栓塞。
头颅CT显示右侧颞叶脑出血。
腹部平片可见气液平面，提示肠梗阻。
骨扫描显示多发放射性浓聚灶。
乳腺钼靶显示簇状微小钙化。
图中箭头所示为病变部位。
图A为平扫，图B为增强扫描。
图像显示肿瘤与周围血管关系密切。
术后复查显示病灶已切除。
治疗后病灶明显缩小。
该图像为轴位T1加权像。
冠状位重建图像显示病变范围。
矢状位图像显示椎管狭窄。
这是一张胸部正位片。
请描述这张医学图像。
这张图像显示了什么？
图中是否存在异常？
病变位于哪个器官？
这是哪一种成像技术？
该病例最可能的诊断是什么？
答案是肺结节。
正确答案是B。
肺窗显示右肺中叶散在小结节，最大者直径约六毫米。
纵隔窗显示纵隔内多发肿大淋巴结。
两肺透亮度增高，膈肌低平，符合肺气肿表现。
左侧胸腔少量积液，邻近肺组织受压膨胀不全。
双肺弥漫性网格状影，以胸膜下分布为主。
支气管壁增厚，管腔内可见痰栓。
心包腔内见少量液体密度影。
主动脉弓部管壁钙化。
肝脏体积缩小，表面凹凸不平，提示肝硬化。
门静脉主干增宽，脾脏增大。
肝内多发大小不等的低密度灶，考虑转移瘤。
胆总管扩张，远端可见结石影。
胰头部见稍低密度肿块，胰管扩张。
右肾见类圆形囊性低密度灶，边界清晰。
左肾盂内见高密度结石，伴肾盂积水。
肾上腺区见结节状软组织密度影。
腹膜后未见肿大淋巴结。
腹腔内见游离气体，提示消化道穿孔。
阑尾增粗，周围脂肪间隙模糊。
小肠肠管扩张积液，可见多个气液平面。
直肠壁不规则增厚，管腔狭窄。
盆腔内见囊实性包块。
卵巢内见无回声区，壁薄光滑。
子宫肌层内见低回声结节，考虑子宫肌瘤。
宫内可见孕囊及胎芽。
胎盘位于子宫前壁，成熟度一级。
羊水量正常。
颈动脉内中膜增厚，可见斑块形成。
下肢深静脉内见低回声充填，考虑血栓形成。
甲状腺弥漫性肿大，回声不均匀。
颈部可见多发肿大淋巴结，皮髓质分界不清。
乳腺内见边界清楚的椭圆形低回声结节。
腋窝淋巴结未见明显肿大。
睾丸回声均匀，未见占位。
脑室周围白质见斑片状异常信号。
小脑半球见类圆形长T2信号影。
垂体形态饱满，信号均匀。
桥小脑角区见占位性病变。
硬膜下见新月形高密度影，考虑硬膜下血肿。
蛛网膜下腔出血，脑沟内见高密度影。
脑干未见异常信号。
双侧乳突气房清晰。
鼻窦黏膜增厚，窦腔内见液平。
颈椎生理曲度变直，椎间隙变窄。
胸椎椎体楔形变，考虑压缩性骨折。
腰椎椎体边缘骨质增生。
骶髂关节面毛糙，关节间隙变窄。
髋关节股骨头密度不均，考虑股骨头坏死。
肩关节冈上肌腱信号增高。
半月板后角见线状高信号，达关节面。
前交叉韧带连续性中断。
跟腱增粗，信号不均。
颅骨骨质完整，未见骨折。
肋骨走行自然，未见骨折征象。
锁骨中段骨折，断端错位。
胫腓骨骨折术后，内固定在位。
软组织肿胀，未见异物。
骨质疏松，骨小梁稀疏。
骨髓信号弥漫性减低。
全身骨显像未见异常放射性浓聚。
病灶代谢明显增高，标准摄取值升高。
病灶大小约二乘三厘米。
病灶密度不均，内见坏死区。
病灶内可见脂肪密度。
病灶边缘光整，与周围组织分界清楚。
病灶与周围组织分界不清，呈浸润性生长。
增强扫描动脉期明显强化，门脉期廓清。
增强后病灶呈渐进性强化。
病灶内见多发斑点状钙化。
周围可见卫星灶。
邻近胸膜牵拉凹陷。
局部骨质破坏，伴软组织肿块。
建议短期复查或进一步增强扫描。
建议结合肿瘤标志物检查。
请结合病史综合分析。
以上所见请结合临床。
诊断意见：右肺上叶结节，建议随访。
诊断意见：肝囊肿。
诊断意见：胆囊结石伴胆囊炎。
诊断意见：腔隙性脑梗死。
诊断意见：未见明显异常。
检查部位：胸部。
检查方法：平扫加增强。
影像所见：
印象：
图一显示病变位于左侧。
图二为术后改变。
该图为苏木精伊红染色切片。
高倍镜下可见核分裂象。
低倍镜显示组织结构紊乱。
荧光显微镜图像显示细胞核染色。
流程图展示了研究的设计。
柱状图比较了两组患者的生存率。
曲线显示治疗组生存期明显延长。
表格列出了患者的基线特征。
本研究纳入了一百二十例患者。
差异具有统计学意义。
敏感性和特异性分别为百分之九十和百分之八十五。
深度学习模型可以辅助医生诊断。
医学影像人工智能正在快速发展。
视觉语言模型能够理解图像并回答问题。
多模态大模型结合了图像和文本信息。
这是一个医学视觉问答任务。
请根据图像回答下列问题。
问题：图中显示的是哪个器官？
答案：肝脏。
问题：该病变最可能是什么？
答案：囊肿。
问题：图像采用了哪种扫描方式？
答案：磁共振成像。
左侧、右侧、上方、下方、前方、后方、内侧、外侧。
头部、颈部、胸部、腹部、盆腔、四肢、脊柱。
高密度、低密度、等密度、混杂密度。
高信号、低信号、等信号、混杂信号。
高回声、低回声、等回声、无回声。
圆形、类圆形、椭圆形、不规则形、分叶状。
单发、多发、散在、弥漫。
良性、恶性、炎性、先天性、退行性。
零一二三四五六七八九十百千。
毫米、厘米、毫升、毫克、毫摩尔每升。
你好，请问有什么可以帮助你？
我是一个医学影像助手，可以帮你解读图像。
这张图像的质量较好，可以用于诊断。
由于图像分辨率有限，无法给出确切诊断。
谢谢，祝你健康。
"""

MEDICAL_EN = """\
The chest radiograph shows clear lung fields without consolidation.
A ground-glass nodule is seen in the right upper lobe.
Axial CT image of the abdomen demonstrates a hypodense lesion in the liver.
The lesion shows rim enhancement after contrast administration.
T2-weighted MRI shows a hyperintense lesion in the left frontal lobe.
Diffusion-weighted imaging reveals restricted diffusion.
Ultrasound shows a hypoechoic nodule in the right thyroid lobe.
Color Doppler demonstrates internal vascularity.
The heart size is within normal limits.
There is no pleural effusion or pneumothorax.
The ventricles are not dilated and the midline is not shifted.
A fracture line is seen in the distal radius.
Mammography shows clustered microcalcifications.
Endoscopy reveals a polyp in the sigmoid colon.
Histopathology shows tumor cells arranged in nests.
Immunohistochemical staining is positive for the tumor marker.
The arrow indicates the lesion.
Panel A shows the non-contrast scan and panel B the contrast-enhanced scan.
Follow-up imaging shows a decrease in lesion size.
Findings are consistent with pneumonia.
Malignancy cannot be excluded; biopsy is recommended.
A 65-year-old man presented with cough for two weeks.
A 42-year-old woman was found to have a thyroid nodule on routine examination.
Computed tomography uses X-rays to produce cross-sectional images.
Magnetic resonance imaging provides excellent soft tissue contrast without ionizing radiation.
Ultrasound is fast, portable and widely used in obstetrics.
Positron emission tomography reflects tissue metabolism.
The image is an axial T1-weighted scan.
Coronal reconstruction shows the extent of the lesion.
Sagittal images demonstrate spinal canal stenosis.
What is the modality of this image?
Where is the lesion located?
How many nodules are visible?
What is the most likely diagnosis?
Is there any abnormality in the image?
Which organ is shown in the image?
The lesion is located in the upper left quadrant.
The answer is B.
The lesion measures approximately two centimeters in diameter.
There is a well-defined round hypodense lesion in the right kidney.
Multiple enlarged lymph nodes are seen in the mediastinum.
The gallbladder contains several small stones.
There is free air under the diaphragm.
The appendix is dilated with surrounding fat stranding.
A subdural hematoma is present along the left convexity.
The image shows a compression fracture of the vertebral body.
No acute intracranial abnormality is identified.
The liver is enlarged with heterogeneous echotexture.
The uterus contains a hypoechoic fibroid.
Bilateral lower lobe opacities are noted.
The cardiomediastinal silhouette is normal.
The left lung shows a large mass with spiculated margins.
Bone density is decreased.
Please answer the question based on the image.
Question: Which organ is shown? Answer: liver.
Question: What abnormality is seen? Answer: a nodule.
The upper left, upper right, lower left and lower right quadrants.
Small, medium and large lesions.
One, two, three lesions.
"""

# Combinatorial fill-ins: vocabulary the demo and real data share.
ORGANS_ZH = [
    "肺",
    "肝脏",
    "肾脏",
    "脾脏",
    "胰腺",
    "胆囊",
    "甲状腺",
    "乳腺",
    "心脏",
    "脑",
    "脊柱",
    "膀胱",
    "子宫",
    "卵巢",
    "前列腺",
    "胃",
    "结肠",
    "骨骼",
    "淋巴结",
    "血管",
]
ORGANS_EN = [
    "lung",
    "liver",
    "kidney",
    "spleen",
    "pancreas",
    "gallbladder",
    "thyroid",
    "breast",
    "heart",
    "brain",
    "spine",
    "bladder",
    "uterus",
    "ovary",
    "prostate",
    "stomach",
    "colon",
    "bone",
    "lymph node",
    "vessel",
]
MODS_ZH = ["CT", "磁共振", "超声", "X线", "PET", "病理", "内镜", "血管造影"]
MODS_EN = ["CT", "MRI", "ultrasound", "X-ray", "PET", "pathology", "endoscopy", "angiography"]
FINDINGS_ZH = ["结节", "肿块", "囊肿", "钙化", "积液", "出血", "梗死", "骨折", "炎症", "占位"]
FINDINGS_EN = [
    "nodule",
    "mass",
    "cyst",
    "calcification",
    "effusion",
    "hemorrhage",
    "infarction",
    "fracture",
    "inflammation",
    "lesion",
]


def corpus_lines() -> list[str]:
    """Return the training corpus as a list of lines (deterministic)."""
    lines: list[str] = []
    lines += ALIGNMENT_PROMPTS_ZH + ALIGNMENT_PROMPTS_EN + INSTRUCTION_PROMPTS_ZH + INSTRUCTION_PROMPTS_EN
    # Prompts as the pipeline renders them, with the <image> placeholder text around them.
    lines += [f"{p} \n<image>" for p in ALIGNMENT_PROMPTS_ZH + ALIGNMENT_PROMPTS_EN]
    lines += [f"<image>\n{p}" for p in ALIGNMENT_PROMPTS_ZH + ALIGNMENT_PROMPTS_EN]
    lines += TEMPLATE_LINES
    lines += MEDICAL_ZH.splitlines() + MEDICAL_EN.splitlines()
    for i, (oz, oe) in enumerate(zip(ORGANS_ZH, ORGANS_EN)):
        for j, (mz, me) in enumerate(zip(MODS_ZH, MODS_EN)):
            fz, fe = FINDINGS_ZH[(i + j) % len(FINDINGS_ZH)], FINDINGS_EN[(i + j) % len(FINDINGS_EN)]
            lines.append(f"{mz}图像显示{oz}可见{fz}。")
            lines.append(f"The {me} image shows a {fe} in the {oe}.")
    lines += templates.all_template_strings()
    # Generator text: enough random cases to cover every template x vocabulary combination.
    lines += list(templates.iter_texts(seed=1234, n=N_GENERATED_CASES))
    # Multi-line questions become one corpus line per text line (SentencePiece is line-based).
    # Duplicates are dropped (first occurrence kept) so templated text does not dominate the
    # merges: repeated template phrases would otherwise become long, attribute-mixing pieces.
    out: dict[str, None] = {}
    for line in lines:
        for s in line.split("\n"):
            if s.strip():
                out.setdefault(s, None)
    return list(out)


def train(out_dir: Path = HERE, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train the SentencePiece model, write HF tokenizer files into out_dir; return the .model path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=CHAR_COVERAGE,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_surface=" \u2047 ",
        max_sentence_length=4192,
        max_sentencepiece_length=MAX_PIECE_LEN,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )
    model_path = out_dir / "tokenizer.model"
    model_path.write_bytes(model.getvalue())
    write_hf_files(out_dir)
    return model_path


def write_hf_files(out_dir: Path) -> None:
    """Write tokenizer_config.json and special_tokens_map.json next to tokenizer.model."""
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        # legacy=True: text after a special token gets the dummy-prefix space, as the LLaMA-2
        # slow tokenizer that LLaVA/Qilin trained with did.
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "use_default_system_prompt": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    # No tokenizer.json on purpose: transformers 5 ignores add_bos_token/add_eos_token from the
    # config when one is present (tokenizer.add_bos_token then reads False and setting
    # add_eos_token drops the BOS). Built from tokenizer.model, loading takes ~0.1 s.
    stale = out_dir / "tokenizer.json"
    if stale.exists():
        stale.unlink()


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args(argv)
    path = train(args.out, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    print(f"wrote {path} (vocab {sp.vocab_size()}) and HF files in {args.out}")


if __name__ == "__main__":
    main()
