import pytest

from api.csvrows import CsvError, CsvLimits, parse_prompts_csv


def problems(data: bytes, limits=CsvLimits()):
    with pytest.raises(CsvError) as exc:
        parse_prompts_csv(data, limits)
    return exc.value.details


def test_valid_csv_with_bom_and_optional_columns():
    data = "\ufeffprompt,seed,num_images,negative_prompt,guidance_scale,steps\n" \
           "a cat,1,2,blurry,4.5,10\n\"a dog, running\",,1,,,\n".encode()
    rows = parse_prompts_csv(data)
    assert [r.prompt for r in rows] == ["a cat", "a dog, running"]
    assert rows[0].seed == 1 and rows[0].num_images == 2 and rows[0].negative_prompt == "blurry"
    assert rows[0].guidance_scale == 4.5 and rows[0].steps == 10
    assert rows[1].seed is None and rows[1].num_images == 1


def test_every_bad_cell_is_reported_with_row_and_column():
    data = b"prompt,seed,num_images\n,1,1\nok,x,1\nok,2,-3\nfine,3,1\n"
    got = {(p.get("row"), p.get("column")) for p in problems(data)}
    assert got == {(1, "prompt"), (2, "seed"), (3, "num_images")}


def test_missing_prompt_column_and_unknown_column():
    got = problems(b"text,colour\nhello,red\n")
    cols = {p.get("column") for p in got}
    assert {"prompt", "text", "colour"} <= cols


def test_bad_encoding_names_the_row():
    got = problems(b"prompt\nfine\nbad \xff byte\n")
    assert got[0]["row"] == 2 and "UTF-8" in got[0]["message"]


def test_empty_file_and_header_only():
    assert problems(b"")[0]["message"]
    assert problems(b"prompt\n")[0]["message"] == "no data rows"


def test_too_many_rows_and_too_long_prompt():
    limits = CsvLimits(max_rows=2, max_prompt_chars=5)
    assert "row limit" in problems(b"prompt\na\nb\nc\n", limits)[0]["message"]
    got = problems(b"prompt\ntoo long\n", limits)
    assert got[0]["row"] == 1 and got[0]["column"] == "prompt"


def test_num_images_over_limit_and_seed_range():
    got = problems(b"prompt,num_images,seed\na,99,1\nb,1,99999999999\n", CsvLimits(max_images_per_row=4))
    assert {(p["row"], p["column"]) for p in got} == {(1, "num_images"), (2, "seed")}


def test_control_characters_are_a_cell_problem():
    got = problems(b"prompt,negative_prompt\nfine,ok\nbad\x00nul,ok\nok,bad\x07bell\n")
    assert {(p["row"], p["column"]) for p in got} == {(2, "prompt"), (3, "negative_prompt")}


def test_image_columns():
    rows = parse_prompts_csv(b"prompt,init_image,strength,mask_image\na,,,\nb,img1,0.3,\nc,img1,,img2\n")
    assert [(r.init_image, r.strength, r.mask_image) for r in rows] == [
        (None, None, None), ("img1", 0.3, None), ("img1", None, "img2")]  # the default is the submit's


def test_image_column_errors_name_row_and_column():
    data = b"prompt,init_image,strength,mask_image\na,img,0,\nb,img,1.01,\nc,,0.5,\nd,,,m\ne,img,x,\n"
    assert {(p["row"], p["column"]) for p in problems(data)} == {
        (1, "strength"), (2, "strength"), (3, "strength"), (4, "mask_image"), (5, "strength")}
    assert "needs init_image" in str(problems(b"prompt,mask_image\nd,m\n"))
